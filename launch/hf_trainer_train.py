#!/usr/bin/env python
"""Fine-tune with Hugging Face ``Trainer`` + PEFT + IST from the same recipe as ``launch/train.py``.

The recipe (``--config``, ``--set section.key=value``; docs/config.md) gives the model (a local
directory, a GGUF file, or a from-scratch architecture), the PEFT method, the data and the ``ist``
block, built by the same code as the job runner's. Where the recipe's ``training`` section and
``TrainingArguments`` overlap, the recipe gives the defaults (``lr`` -> ``--learning_rate``,
``micro_batch_size`` -> ``--per_device_train_batch_size``, ``global_batch_size`` -> gradient
accumulation over the ranks, ``max_steps``, ``epochs``, ``weight_decay``, ``warmup_steps``,
``max_grad_norm``, ``seed``, ``log_every``, ``save_every``; ``output_dir``; ``model.dtype: bfloat16``
-> ``--bf16``; ``backend.deepspeed_config`` (a path) -> ``--deepspeed``) and every
``TrainingArguments`` flag given on the command line wins (``--deepspeed``, ``--save_steps``,
``--resume_from_checkpoint``, ``--report_to tensorboard``, ``--eval_strategy``, ...).

    # 2 ranks, ZeRO-2, the embedded quick start (CPU: export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1)
    deepspeed --num_gpus 2 launch/hf_trainer_train.py --config configs/quickstart.yaml \\
        --deepspeed configs/hf_trainer_zero2.json --output_dir runs/hf_tiny --max_steps 60 --save_steps 30

    # the paper's setting from its recipe, under Trainer
    deepspeed --num_gpus 8 launch/hf_trainer_train.py --config configs/paper_llama7b_lora.yaml \\
        --set model.path=/models/llama-7b --set data.train=/data/commonsense_170k.json \\
        --deepspeed configs/hf_trainer_zero3.json --output_dir runs/llama7b_ist --report_to tensorboard

The held-out split is the recipe's test data (``data.test``, or the train file's sibling; at most
``data.max_eval_examples`` records): Trainer evaluates it at the end, and during training with
``--eval_strategy steps``. See docs/hf_trainer.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

logger = logging.getLogger("hf_trainer_train")


def read_recipe(argv: list[str]):
    """(Recipe, the remaining arguments): ``--config`` and ``--set`` are the job runner's options."""
    from ist_ds.jobs.recipe import Recipe

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, rest = parser.parse_known_args(argv)
    recipe = Recipe.from_yaml(known.config) if known.config else Recipe()
    if known.overrides:
        recipe = recipe.with_overrides(known.overrides)
    return recipe, rest


def training_defaults(recipe, world_size: int) -> dict:
    """``TrainingArguments`` defaults taken from the recipe where the two overlap."""
    from ist_ds.core.errors import ISTConfigError

    t = recipe.training
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise ISTConfigError(f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size="
                             f"{t.micro_batch_size} x world size {world_size}")
    defaults = {
        "output_dir": recipe.output_dir, "learning_rate": t.lr, "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "num_train_epochs": t.epochs, "max_steps": t.max_steps or -1, "weight_decay": t.weight_decay,
        "warmup_steps": t.warmup_steps, "max_grad_norm": t.max_grad_norm or 0.0, "seed": t.seed,
        "logging_steps": t.log_every, "save_strategy": "steps" if t.save_every else "no",
        "save_steps": t.save_every or 500, "bf16": recipe.model.dtype == "bfloat16",
        "gradient_checkpointing": recipe.model.gradient_checkpointing, "lr_scheduler_type": "linear",
    }
    if isinstance(recipe.backend.deepspeed_config, str):
        defaults["deepspeed"] = recipe.backend.deepspeed_config
    return defaults


def parse_args(argv: list[str]):
    """(Recipe, TrainingArguments); on DeepSpeed's CPU accelerator, with every rank counted."""
    from transformers import HfArgumentParser, TrainingArguments

    from ist_ds.integrations import init_cpu_deepspeed

    recipe, rest = read_recipe(argv)
    parser = HfArgumentParser(TrainingArguments)
    parser.set_defaults(**training_defaults(recipe, int(os.environ.get("WORLD_SIZE", "1"))))
    namespace, remaining = parser.parse_known_args(rest)
    if remaining:
        parser.error(f"unrecognised arguments: {' '.join(remaining)}")
    values = vars(namespace)
    if values.get("deepspeed") and not values.get("accelerator_config"):
        # accelerate cannot count the ranks of a DeepSpeed job on the CPU accelerator by itself
        values["accelerator_config"] = init_cpu_deepspeed() or None
    training = TrainingArguments(**{k: v for k, v in values.items()
                                    if k in {f.name for f in dataclasses.fields(TrainingArguments) if f.init}})
    return recipe, training


def build(recipe):
    """Model (with adapters), tokenizer, train and held-out datasets and collator, as the job runner builds them."""
    from ist_ds.jobs.data import InstructionDataset, PadCollator, load_task, load_tokenizer
    from ist_ds.jobs.assembly import build_recipe_model, model_directory, tokenizer_source, train_data_source

    d = recipe.data
    model_dir = model_directory(recipe)
    tokenizer = load_tokenizer(tokenizer_source(recipe, model_dir))
    task = load_task(train_data_source(recipe), test_path=d.test, num_train=d.num_train, num_test=d.num_test,
                     seed=d.seed)
    make = lambda rs: InstructionDataset(rs, tokenizer, cutoff_len=d.cutoff_len,  # noqa: E731
                                         train_on_inputs=d.train_on_inputs)
    test = task.test[:d.max_eval_examples]
    model = build_recipe_model(recipe, tokenizer, model_dir)
    return model, tokenizer, make(task.train), make(test) if test else None, PadCollator(tokenizer.pad_token_id,
                                                                                           pad_to_multiple_of=8)


def main(argv: list[str] | None = None) -> int:
    from ist_ds.core.errors import ISTError

    try:
        recipe, training = parse_args(sys.argv[1:] if argv is None else argv)
    except ISTError as e:
        print(f"hf_trainer_train: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if training.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import set_seed

    from ist_ds.core import ISTConfig
    from ist_ds.integrations import ISTTrainer

    set_seed(training.seed)
    model, tokenizer, train, evaluation, collator = build(recipe)
    # The recipe's ist block, unless it is the default and the DeepSpeed config carries one (given twice,
    # they must agree: ISTTrainer checks).
    ist_config = recipe.ist.to_dict() if recipe.ist != ISTConfig() or not training.deepspeed else None
    trainer = ISTTrainer(model=model, args=training, train_dataset=train, eval_dataset=evaluation,
                         data_collator=collator, ist_config=ist_config)
    if not trainer.ist_config.enabled:
        logger.warning("IST is off (ist.enabled: false)")
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
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
