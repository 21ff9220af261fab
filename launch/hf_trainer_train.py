#!/usr/bin/env python
"""Fine-tune with Hugging Face ``Trainer`` + PEFT LoRA + IST: the Trainer way of running ist_ds.

Every ``TrainingArguments`` flag works (``--deepspeed``, ``--gradient_accumulation_steps``,
``--save_steps``, ``--resume_from_checkpoint``, ``--report_to tensorboard``, ``--eval_strategy``,
``--load_best_model_at_end``, ...). The IST settings are the ``ist`` block of the DeepSpeed config,
or ``--ist_config '<json>'`` (a JSON object or a JSON file) without DeepSpeed.

    # 2 ranks, ZeRO-2, tiny Llama and the embedded task (CPU: export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1)
    deepspeed --num_gpus 2 launch/hf_trainer_train.py --deepspeed configs/hf_trainer_zero2.json \\
        --output_dir runs/hf_tiny --max_steps 60 --logging_steps 10 --save_steps 30

    # a local model and an LLM-Adapters dataset, the reference recipe (lr 2e-4, LoRA r=32/alpha=64 on
    # q,k,v,up,down, batch 16, 3 epochs, cutoff 256)
    deepspeed --num_gpus 8 launch/hf_trainer_train.py --deepspeed configs/hf_trainer_zero3.json \\
        --model_name_or_path /models/llama-7b --data /data/commonsense_170k.json \\
        --output_dir runs/llama7b_ist --num_train_epochs 3 --per_device_train_batch_size 2 \\
        --gradient_accumulation_steps 1 --bf16 --save_steps 1000 --report_to tensorboard

See docs/hf_trainer.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field

logger = logging.getLogger("hf_trainer_train")


@dataclass
class ScriptArguments:
    """What to fine-tune, on what, and the IST settings when there is no DeepSpeed config."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A local Hugging Face causal-LM directory; none: a tiny random Llama "
                                        "built by ist_ds.models (with the byte tokenizer)"})
    tiny_arch: str = field(default="llama", metadata={"help": "Architecture of the tiny model (llama, qwen2, "
                                                              "mistral, gpt2)"})
    tiny_layers: int = field(default=8, metadata={"help": "Transformer blocks of the tiny model"})
    tiny_hidden: int = field(default=64, metadata={"help": "Hidden size of the tiny model"})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer directory; default: the model's, "
                                                                  "or the byte tokenizer for the tiny model"})
    data: str = field(default="embedded", metadata={"help": "'embedded' (the built-in task), or an LLM-Adapters "
                                                           "JSON file or task directory"})
    num_train: int = field(default=2000, metadata={"help": "Examples of the embedded task"})
    val_set_size: int = field(default=0, metadata={"help": "Training examples held out for evaluation"})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example"})
    train_on_inputs: bool = field(default=True, metadata={"help": "Also learn the prompt tokens"})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 32, tiny model 8)"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 64, tiny model 16)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (tiny model: 0)"})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,up_proj,down_proj",
                                     metadata={"help": "Comma-separated module names LoRA adapts"})
    ist_config: str | None = field(
        default=None, metadata={"help": "IST settings as a JSON object or JSON file; default: the DeepSpeed "
                                        "config's 'ist' block, or the reference defaults without DeepSpeed"})


def parse_args(argv: list[str]):
    """(ScriptArguments, TrainingArguments); on DeepSpeed's CPU accelerator, with every rank counted."""
    from transformers import HfArgumentParser, TrainingArguments

    from ist_ds.integrations import init_cpu_deepspeed

    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(learning_rate=2e-4, per_device_train_batch_size=4, num_train_epochs=3, logging_steps=10,
                        save_strategy="steps", save_steps=500, warmup_steps=100, seed=42)
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        parser.error(f"unrecognised arguments: {' '.join(remaining)}")
    values = vars(namespace)
    script = ScriptArguments(**{f.name: values.pop(f.name) for f in dataclasses.fields(ScriptArguments)})
    if values.get("deepspeed") and not values.get("accelerator_config"):
        # accelerate cannot count the ranks of a DeepSpeed job on the CPU accelerator by itself
        values["accelerator_config"] = init_cpu_deepspeed() or None
    training = TrainingArguments(**{k: v for k, v in values.items()
                                    if k in {f.name for f in dataclasses.fields(TrainingArguments) if f.init}})
    return script, training


def build_model_and_tokenizer(script: ScriptArguments):
    from peft import LoraConfig, get_peft_model

    from ist_ds.data import load_tokenizer

    targets = [m.strip() for m in script.lora_target_modules.split(",") if m.strip()]
    if script.model_name_or_path is None:
        from ist_ds.models import apply_peft, build_model

        model = build_model(script.tiny_arch, seed=0, num_hidden_layers=script.tiny_layers,
                            hidden_size=script.tiny_hidden, intermediate_size=2 * script.tiny_hidden,
                            max_position_embeddings=max(512, script.cutoff_len))
        tokenizer = load_tokenizer(script.tokenizer or "byte")
        model = apply_peft(model, "lora", r=script.lora_r or 8, alpha=script.lora_alpha or 16, dropout=0.0,
                           target_modules=None if script.tiny_arch == "gpt2" else targets)
        return model, tokenizer

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(script.tokenizer or script.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, dtype="auto")
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(r=script.lora_r or 32, lora_alpha=script.lora_alpha or 64, lora_dropout=script.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def build_data(script: ScriptArguments, tokenizer, seed: int):
    import random

    from ist_ds.data import InstructionDataset, PadCollator, load_task

    task = load_task(script.data, num_train=script.num_train, seed=seed)
    records = list(task.train)
    eval_records = []
    if script.val_set_size > 0:
        random.Random(seed).shuffle(records)
        eval_records, records = records[:script.val_set_size], records[script.val_set_size:]
    make = lambda rs: InstructionDataset(rs, tokenizer, cutoff_len=script.cutoff_len,  # noqa: E731
                                         train_on_inputs=script.train_on_inputs)
    train = make(records)
    evaluation = make(eval_records) if eval_records else None
    return train, evaluation, PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)


def read_ist_option(value: str | None):
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return json.load(f)
    return json.loads(value)


def main(argv: list[str] | None = None) -> int:
    script, training = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if training.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import set_seed

    from ist_ds.integrations import ISTTrainer

    set_seed(training.seed)
    model, tokenizer = build_model_and_tokenizer(script)
    train, evaluation, collator = build_data(script, tokenizer, training.seed)
    ist_config = read_ist_option(script.ist_config)
    if ist_config is None and not training.deepspeed:
        ist_config = {}  # the reference defaults
    trainer = ISTTrainer(model=model, args=training, train_dataset=train, eval_dataset=evaluation,
                         data_collator=collator, ist_config=ist_config)
    if not trainer.ist_config.enabled:
        logger.warning("IST is off (no 'ist' block in the DeepSpeed config and no --ist_config)")
    resume = training.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if trainer.ist is not None and trainer.is_world_process_zero():
        logger.info("final IST scores %s, selection counts %s", [f"{s:.3g}" for s in trainer.ist.scores.tolist()],
                    trainer.ist.selection_counts)
    if evaluation is not None:
        trainer.log(trainer.evaluate())
    logger.info("done: %s", result.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
