"""Layer discovery, set_trainable and response suppression on tiny models, every method x arch.

Freshly initialised adapters are no-ops (LoRA's lora_B = 0, IA3's vector = 1), so every model here is
perturbed first: otherwise "suppression changes the output" would pass or fail for the wrong reason.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from ist_ds.core.errors import ISTConfigError, ISTModelError
from ist_ds.model.layer_map import LayerMap
from ist_ds.model.layers import discover_layers, set_trainable
from ist_ds.jobs.models import ARCHS, DEFAULT_TARGET_MODULES, METHODS, apply_peft, build_model
from ist_ds.model.suppression import suppress, uses_scaling

NUM_LAYERS = 4
# GPT-2's c_proj suffix matches the attention and the MLP projection: 4 tuner layers per block.
TUNERS_PER_BLOCK = {"llama": 5, "qwen2": 5, "mistral": 5, "gpt2": 4}
# Trainable tensors per tuner layer (LoKr's factorisation depends on the shapes: checked separately).
PARAMS_PER_TUNER = {"lora": 2, "dora": 3, "loha": 4, "ia3": 1}
BLOCKS_PATH = {
    "llama": "base_model.model.model.layers",
    "qwen2": "base_model.model.model.layers",
    "mistral": "base_model.model.model.layers",
    "gpt2": "base_model.model.transformer.h",
}
# peft 0.21 LoHa/LoKr cannot wrap transformers' Conv1D, which is all GPT-2 has.
UNSUPPORTED = {("gpt2", "loha"), ("gpt2", "lokr")}
COMBOS = [(a, m) for a in ARCHS for m in METHODS if (a, m) not in UNSUPPORTED]


def _perturb(model: torch.nn.Module, seed: int = 0, magnitude: bool = False) -> None:
    """Give every adapter parameter a random non-trivial value.

    DoRA's magnitude vector is left at its initial ``||W||`` unless ``magnitude`` is set, so that
    suppressing DoRA with scale 0 is still the base model (see ist_ds.model.suppression).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "lora_magnitude_vector" in name:
                if magnitude:
                    p.mul_(1 + 0.3 * noise)
            elif "ia3_l" in name:
                p.copy_(1 + 0.5 * noise)
            else:
                p.copy_(0.2 * noise)


def _make(arch: str, method: str, **peft_kwargs) -> tuple[torch.nn.Module, LayerMap]:
    model = apply_peft(build_model(arch, seed=0), method, **peft_kwargs)
    layer_map = discover_layers(model)  # before anything touches requires_grad
    _perturb(model)
    model.eval()
    return model, layer_map


INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(123))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _scalings(layer_map: LayerMap) -> dict[tuple[int, int, str], float]:
    """Every scaling value of every tuner layer, keyed by (layer, tuner position, adapter)."""
    return {
        (layer.index, j, name): value
        for layer in layer_map.layers
        for j, m in enumerate(layer.tuner_modules)
        if isinstance(getattr(m, "scaling", None), dict)
        for name, value in m.scaling.items()
    }


def _hook_count(layer_map: LayerMap) -> int:
    return sum(len(m._forward_hooks) for layer in layer_map.layers for m in layer.tuner_modules)


# --------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_overrides_and_seed(arch: str) -> None:
    model = build_model(arch, seed=3, num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.config.num_attention_heads == 2 and model.config.vocab_size == 259
    again = build_model(arch, seed=3, num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_unknown_arch_and_method() -> None:
    with pytest.raises(ISTConfigError, match="unknown arch 'llamma'.*similar: llama"):
        build_model("llamma")
    with pytest.raises(ISTConfigError, match="no causal-LM head"):
        build_model("clip")
    with pytest.raises(ISTConfigError, match="lora, dora, loha, lokr, ia3"):
        apply_peft(build_model("llama"), "prefix")


@pytest.mark.parametrize("arch,method", sorted(UNSUPPORTED))
def test_unsupported_combination_is_a_config_error(arch: str, method: str) -> None:
    with pytest.raises(ISTConfigError, match="Conv1D"):
        apply_peft(build_model(arch), method)


# ------------------------------------------------------------------------------------------ discovery


@pytest.mark.parametrize("arch,method", COMBOS)
def test_discovery(arch: str, method: str) -> None:
    model = apply_peft(build_model(arch, seed=0), method)
    layer_map = discover_layers(model)
    assert layer_map.num_layers == NUM_LAYERS
    assert layer_map.blocks_path == BLOCKS_PATH[arch]
    assert layer_map.outside_params == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    seen: set[str] = set()
    for i, layer in enumerate(layer_map.layers):
        assert layer.index == i
        assert layer.module is model.get_submodule(f"{BLOCKS_PATH[arch]}.{i}")
        assert len(layer.tuner_modules) == TUNERS_PER_BLOCK[arch]
        if method == "lokr":
            assert len(layer.params) >= len(layer.tuner_modules)
        else:
            assert len(layer.params) == TUNERS_PER_BLOCK[arch] * PARAMS_PER_TUNER[method]
        for name, p in layer.params:
            assert name.startswith(f"{BLOCKS_PATH[arch]}.{i}.")
            assert p is model.get_parameter(name)
        seen.update(n for n, _ in layer.params)
    assert seen == trainable
    assert layer_map.parameters_of([2, 0]) == [p for _, p in layer_map.layers[2].params] + [
        p for _, p in layer_map.layers[0].params
    ]


def test_blocks_path_override_and_bad_paths() -> None:
    model = apply_peft(build_model("llama", seed=0), "lora")
    auto = discover_layers(model)
    explicit = discover_layers(model, blocks_path="base_model.model.model.layers")
    assert explicit.blocks_path == auto.blocks_path
    assert [[n for n, _ in layer.params] for layer in explicit.layers] == [
        [n for n, _ in layer.params] for layer in auto.layers
    ]
    with pytest.raises(ISTConfigError, match="does not exist"):
        discover_layers(model, blocks_path="base_model.model.model.nope")
    with pytest.raises(ISTConfigError, match="not a torch.nn.ModuleList"):
        discover_layers(model, blocks_path="base_model.model.model.norm")
    with pytest.raises(ISTConfigError, match="not a torch.nn.ModuleList"):
        discover_layers(model, blocks_path="base_model.model.model")


def test_model_without_adapters() -> None:
    with pytest.raises(ISTModelError, match="get_peft_model"):
        discover_layers(build_model("llama"))


def test_injected_adapters_without_peft_model() -> None:
    model = build_model("qwen2", seed=0)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=DEFAULT_TARGET_MODULES["qwen2"]), model)
    layer_map = discover_layers(model)
    assert layer_map.blocks_path == "model.layers"
    assert layer_map.num_layers == NUM_LAYERS
    assert all(len(layer.tuner_modules) == 5 and len(layer.params) == 10 for layer in layer_map.layers)
    assert all("lora_" in n for layer in layer_map.layers for n, _ in layer.params)


def test_ambiguous_block_lists_need_blocks_path(caplog: pytest.LogCaptureFixture) -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    class EncDec(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.ModuleList(Block() for _ in range(2))
            self.dec = torch.nn.ModuleList(Block() for _ in range(2))

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"]), EncDec())
    with pytest.raises(ISTModelError, match="blocks_path"):
        discover_layers(model)
    with caplog.at_level(logging.WARNING, logger="ist_ds.model.layers"):
        layer_map = discover_layers(model, blocks_path="enc")
    assert layer_map.num_layers == 2
    assert {n.split(".")[0] for n, _ in layer_map.outside_params} == {"dec"}
    assert "outside 'enc'" in caplog.text


def test_block_without_trainable_params_is_named() -> None:
    model = apply_peft(build_model("llama", seed=0), "lora")
    for p in model.get_submodule("base_model.model.model.layers.2").parameters():
        p.requires_grad_(False)
    with pytest.raises(ISTModelError, match="block 2"):
        discover_layers(model)


def test_trainable_lm_head_is_outside() -> None:
    model = apply_peft(build_model("llama", seed=0), "lora", modules_to_save=["lm_head"])
    layer_map = discover_layers(model)
    names = [n for n, _ in layer_map.outside_params]
    assert names and all("lm_head" in n for n in names)

    model = apply_peft(build_model("mistral", seed=0), "ia3")
    model.get_submodule("base_model.model.lm_head").weight.requires_grad_(True)
    layer_map = discover_layers(model)
    assert [n for n, _ in layer_map.outside_params] == ["base_model.model.lm_head.weight"]


def test_set_trainable_flips_exactly_the_selected_layers() -> None:
    model = apply_peft(build_model("llama", seed=0), "lora", modules_to_save=["lm_head"])
    layer_map = discover_layers(model)
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    outside = {n for n, _ in layer_map.outside_params}
    for selected in ({0, 2}, [1], [], [0, 1, 2, 3], [3, 3]):
        set_trainable(layer_map, selected)
        for layer in layer_map.layers:
            assert all(p.requires_grad == (layer.index in set(selected)) for _, p in layer.params)
        now_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert outside <= now_trainable
        assert not (frozen_before & now_trainable)  # base weights never unfrozen
    with pytest.raises(ISTConfigError, match="out of range"):
        set_trainable(layer_map, [4])


# ---------------------------------------------------------------------------------------- suppression


@pytest.mark.parametrize("arch,method", COMBOS)
def test_suppression_changes_output_and_restores_bit_exactly(arch: str, method: str) -> None:
    model, layer_map = _make(arch, method)
    ref = _logits(model)
    scalings = _scalings(layer_map)
    with suppress(layer_map, [1], 0.25):
        damped = _logits(model)
        for (i, j, name), value in _scalings(layer_map).items():
            expected = scalings[(i, j, name)] * 0.25 if i == 1 else scalings[(i, j, name)]
            assert value == expected
        assert all(
            len(m._forward_hooks) == (0 if i != 1 or uses_scaling(m) else 1)
            for i, layer in enumerate(layer_map.layers)
            for m in layer.tuner_modules
        )
    assert (damped - ref).abs().max() > 1e-4
    assert torch.equal(_logits(model), ref)
    after = _scalings(layer_map)
    assert after.keys() == scalings.keys()
    assert all(after[k] is scalings[k] for k in scalings)  # the original objects are back
    assert _hook_count(layer_map) == 0


@pytest.mark.parametrize("arch,method", COMBOS)
def test_suppressing_everything_with_zero_is_the_base_model(arch: str, method: str) -> None:
    model, layer_map = _make(arch, method)
    with model.disable_adapter():
        base = _logits(model)
    assert (_logits(model) - base).abs().max() > 1e-4  # the adapters matter
    with suppress(layer_map, range(NUM_LAYERS), 0.0):
        zero = _logits(model)
    assert torch.equal(zero, base)


def test_dora_magnitude_is_not_suppressed() -> None:
    """Damping ``scaling`` damps DoRA's direction update only; a trained magnitude still acts."""
    model, layer_map = _make("llama", "dora")
    _perturb(model, seed=1, magnitude=True)
    with model.disable_adapter():
        base = _logits(model)
    with suppress(layer_map, range(NUM_LAYERS), 0.0):
        zero = _logits(model)
    assert (zero - base).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_suppression_equals_vector_toward_one(arch: str) -> None:
    """For IA3 the hook is the same as replacing the vector l by 1 + scale * (l - 1)."""
    model, layer_map = _make(arch, "ia3")
    scale = 0.25
    with suppress(layer_map, [0, 2], scale):
        damped = _logits(model)
    with torch.no_grad():
        for i in (0, 2):
            for _, p in layer_map.layers[i].params:
                p.copy_(1 + scale * (p - 1))
    torch.testing.assert_close(damped, _logits(model), rtol=1e-5, atol=1e-5)


def test_lora_suppression_equals_scaled_b() -> None:
    model, layer_map = _make("qwen2", "lora")
    with suppress(layer_map, [3], 0.25):
        damped = _logits(model)
    with torch.no_grad():
        for name, p in layer_map.layers[3].params:
            if "lora_B" in name:
                p.mul_(0.25)
    torch.testing.assert_close(damped, _logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_exception_inside_suppression_restores(method: str) -> None:
    model, layer_map = _make("mistral", method)
    ref = _logits(model)
    scalings = _scalings(layer_map)
    with pytest.raises(RuntimeError, match="boom"):
        with suppress(layer_map, [0, 3], 0.5):
            _logits(model)
            raise RuntimeError("boom")
    assert torch.equal(_logits(model), ref)
    assert all(_scalings(layer_map)[k] is v for k, v in scalings.items())
    assert _hook_count(layer_map) == 0


def test_suppression_validates_arguments_and_scale_one_is_noop() -> None:
    model, layer_map = _make("llama", "ia3")
    with pytest.raises(ISTConfigError, match="out of range"):
        with suppress(layer_map, [NUM_LAYERS], 0.25):
            pass
    with pytest.raises(ISTConfigError, match="finite"):
        with suppress(layer_map, [0], float("nan")):
            pass
    ref = _logits(model)
    with suppress(layer_map, [0, 1], 1.0):
        assert _hook_count(layer_map) == 0
        assert torch.equal(_logits(model), ref)


def test_suppression_does_not_write_parameters() -> None:
    model, layer_map = _make("llama", "loha")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    versions = {n: p._version for n, p in model.named_parameters()}
    with suppress(layer_map, [0, 1, 2], 0.25):
        _logits(model)
    for n, p in model.named_parameters():
        assert p._version == versions[n] and torch.equal(p, before[n]), n
