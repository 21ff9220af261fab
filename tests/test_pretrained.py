"""Models from anything transformers loads locally: a GGUF file converted once, any AutoConfig architecture,
and the errors a wrong model path or size gives.

The GGUF file is written here (a 2-layer Llama with a byte-level BPE vocabulary, in llama.cpp's tensor
layout), so nothing is downloaded; the test skips when the optional ``gguf`` package is missing.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed import run_ranks

from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.jobs.recipe import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert script reorders the rows of q/k (rotary halves interleaved); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: str, seed: int = 0):
    """Write a 2-layer Llama (hidden 64, vocabulary 259) as an F32 GGUF file; returns the model it holds."""
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["he", "<|endoftext|>", "<|pad|>"]
    eos, pad = len(tokens) - 2, len(tokens) - 1
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])  # 1 normal, 3 control
    w.add_token_merges(["h e"])
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(pad)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for hf, cpp in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{cpp}.weight"
    for hf, cpp in names.items():
        t = sd[hf]
        if hf.endswith("q_proj.weight"):
            t = _llama_cpp_permute(t, 4)
        elif hf.endswith("k_proj.weight"):
            t = _llama_cpp_permute(t, 2)
        w.add_tensor(cpp, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_gguf_file_is_converted_once_into_a_cached_hf_directory(tmp_path, monkeypatch):
    """A GGUF file becomes a safetensors + tokenizer directory whose model computes what the original did;
    a second resolution reuses it without loading the GGUF file again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ist_ds.jobs.pretrained as pretrained

    model_dir, cache = tmp_path / "models", tmp_path / "cache"
    model_dir.mkdir()
    original = write_tiny_llama_gguf(str(model_dir / "tiny.gguf"))
    # Converted by a rank other than 0 of a job (transformers' save_pretrained writes on rank 0 only).
    with monkeypatch.context() as m:
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
        converted = pretrained.model_directory(str(model_dir), "tiny.gguf", str(cache))
    assert converted.startswith(str(cache)) and os.path.isfile(os.path.join(converted, "model.safetensors"))
    source = json.load(open(os.path.join(converted, pretrained.SOURCE_FILE)))
    assert source["logits_max_abs_diff"] == 0.0  # the saved copy against the GGUF-loaded model
    reloaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 2 and not hasattr(reloaded.config, "quantization_config")
    ids = torch.tensor([[258, 104, 101, 108, 108, 111, 32, 119]])
    with torch.no_grad():  # the model written into the GGUF file, through llama.cpp's layout and back
        torch.testing.assert_close(reloaded(input_ids=ids).logits, original(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.decode(tok("hello")["input_ids"], skip_special_tokens=True) == "hello"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    # Cached: no second conversion (converting now would fail).
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert pretrained.model_directory(str(model_dir), "tiny.gguf", str(cache)) == converted

    # The job runner: model.gguf_file in a recipe, the model's own tokenizer by default, 2 steps on one
    # forked rank (the job joins a process group: not in the test process).
    recipe = Recipe.from_dict({
        "model": {"path": str(model_dir), "gguf_file": "tiny.gguf", "cache_dir": str(cache)},
        "peft": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"num_train": 16, "num_test": 4, "max_eval_examples": 4, "cutoff_len": 256},
        "training": {"max_steps": 2, "micro_batch_size": 4, "global_batch_size": 4, "log_every": 1,
                     "eval_at_start": True, "sample_answers": 1, "tensorboard": False, "progress": False},
        "backend": {"name": "single"},
        "ist": {"train_layers": 1, "num_suppression_sets": 2, "update_interval": 1, "scoring_batch_size": 4},
        "output_dir": str(tmp_path / "run")})
    (summary,) = run_ranks(_job, 1, recipe)
    assert summary["steps"] == 2 and len(summary["scores"]) == 2
    assert {"eval_loss_before", "eval_accuracy_before", "eval_loss"} <= set(summary)
    assert isinstance(summary["sample_answers"][0]["answer"], str)
    assert (tmp_path / "run" / "tokenizer.json").exists()  # the GGUF's tokenizer, not the byte tokenizer


def _job(rank, world, recipe):
    from ist_ds.jobs.runner import run

    return run(recipe)


def test_model_path_errors(tmp_path):
    from ist_ds.jobs.pretrained import model_directory

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ISTModelError, match="has no config.json"):
        model_directory(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ISTModelError, match=r"GGUF file\(s\) \['m.gguf'\]: set model.gguf_file"):
        model_directory(str(tmp_path))
    with pytest.raises(ISTModelError, match="not a local directory"):
        model_directory(str(tmp_path / "missing"))
    with pytest.raises(ISTModelError, match="'other.gguf' not found in model.path"):
        model_directory(str(tmp_path), "other.gguf", str(tmp_path / "cache"))


def test_cli_reports_a_directory_without_config_json(tmp_path):
    """`ist-ds train` with a model directory that is not a Hugging Face one: one error line, exit 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "launch/train.py", "--set", "backend.name=single", "--set",
                           f"model.path={tmp_path}", "--set", f"output_dir={tmp_path / 'out'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"ist-ds: error: model.path '{tmp_path}' has no config.json" in proc.stderr


@pytest.mark.parametrize("raw, needle", [
    ({"model": {"config": {"num_hidden_layers": 0}}}, "num_hidden_layers must be a positive number"),
    ({"model": {"arch": "gpt2", "config": {"n_layer": 0}}}, "n_layer must be a positive"),
    ({"model": {"arch": "llamma"}}, "unknown arch 'llamma'.*similar: llama"),
    ({"model": {"arch": "clip"}}, "no causal-LM head"),
    ({"model": {"path": "/m", "config": {"num_hidden_layers": 2}}}, "model's own config is used"),
    ({"model": {"gguf_file": "model.bin"}}, "must name a .gguf file"),
    ({"backend": {"name": "deepspeed", "reshard_after_forward": False}}, "FSDP2 option"),
])
def test_model_recipe_errors(raw, needle):
    with pytest.raises(ISTConfigError, match=needle):
        Recipe.from_dict(raw)


@pytest.mark.parametrize("arch", ["gemma", "phi3", "qwen3"])
def test_any_autoconfig_architecture_builds_and_trains_with_ist(arch):
    """model.arch is any causal-LM model_type transformers knows, not a fixed list: a tiny one is built, LoRA
    (default Llama projections where the model has them) and IST find its layers, and a step trains."""
    from ist_ds.model.layers import discover_layers
    from ist_ds.jobs.models import apply_peft, build_model

    recipe = Recipe.from_dict({"model": {"arch": arch, "config": {"num_hidden_layers": 3}}})
    model = build_model(recipe.model.arch, seed=0, **recipe.model.config)
    assert model.config.model_type == arch and model.config.num_hidden_layers == 3
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # tiny sizes, not the big model's defaults
    targets = ["qkv_proj", "down_proj"] if arch == "phi3" else None  # Phi-3 fuses q, k, v
    if arch == "phi3":
        with pytest.raises(ISTConfigError, match="set peft.target_modules"):
            apply_peft(build_model(arch, seed=0, num_hidden_layers=3), "lora")
    peft_model = apply_peft(model, "lora", r=4, target_modules=targets)
    assert discover_layers(peft_model).num_layers == 3
    ids = torch.randint(0, 200, (2, 12))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)
