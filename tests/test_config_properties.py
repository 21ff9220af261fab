"""Property-based checks of config validation: any input either builds or raises ISTConfigError.

Random ``ist`` blocks and training recipes, mixing valid values, wrong types, out-of-range numbers,
unknown keys and contradictory options. Whatever comes in, validation never crashes with another
exception type, a rejected config names the offending key (one the input holds, and without which
that error goes away), and an accepted one is consistent.
"""

import math
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ist_ds.core import ISTConfig, ImportanceState
from ist_ds.core.errors import ISTConfigError
from ist_ds.jobs.recipe import Recipe

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=5), st.lists(st.integers(), max_size=2))
count = st.one_of(st.integers(-2, 40), st.floats(-0.5, 1.5), junk)

IST_VALUES = {
    "enabled": st.one_of(st.booleans(), junk),
    "strategy": st.one_of(st.sampled_from(["ist", "rst", "all"]), junk),
    "train_layers": count,
    "suppress_layers": count,
    "num_suppression_sets": st.one_of(st.integers(-1, 50), junk),
    "update_interval": st.one_of(st.integers(-1, 20), junk),
    "eta": st.one_of(st.floats(-100, 100), junk),
    "suppression_scale": st.one_of(st.floats(-1, 2), junk),
    "scoring_batch_size": st.one_of(st.integers(-1, 64), junk),
    "scoring_micro_batch_size": st.one_of(st.none(), st.integers(-1, 8), junk),
    "initial_score": st.one_of(st.floats(-5, 5), junk),
    "seed": st.one_of(st.integers(-3, 100), junk),
    "optimizer_state": st.one_of(st.sampled_from(["keep", "offload", "drop"]), junk),
    "offload_target": st.one_of(st.sampled_from(["host", "disk"]), junk),
    "offload_dir": st.one_of(st.none(), st.just("/tmp/ist"), junk),
    "blocks_path": st.one_of(st.none(), st.just("model.layers"), junk),
    "agreement_check_interval": st.one_of(st.integers(-1, 5), junk),
    "target": st.one_of(st.sampled_from(["peft", "full"]), junk),
    "full_params": st.one_of(st.none(), st.lists(st.sampled_from(["self_attn", "mlp", ""]), max_size=2), junk),
    "train_outside": st.one_of(st.none(), st.sampled_from(["always", "never"]),
                               st.lists(st.sampled_from(["lm_head", ""]), max_size=2), junk),
    "full_suppression": st.one_of(st.sampled_from(["residual", "delta"]), junk),
    "verify_engine_files": st.one_of(st.booleans(), junk),
}

ist_blocks = st.fixed_dictionaries({}, optional=IST_VALUES)
extra_keys = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in IST_VALUES), junk, max_size=1)


def _named(msg: str, raw: dict, prefix: str) -> list:
    """The keys of ``raw`` that an error message names: ``prefix.key`` or the quoted key."""
    return [k for k in raw if isinstance(k, str) and (re.search(rf"\b{re.escape(prefix)}\.{re.escape(k)}\b", msg)
                                                      or repr(k) in msg)]


def _ist_error(raw: dict) -> str | None:
    try:
        ISTConfig.from_dict(raw)
    except ISTConfigError as e:
        return str(e)
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=ist_blocks, extra=extra_keys, num_layers=st.integers(1, 12))
# contradictions that random blocks rarely hit, always tried
@example(block={"optimizer_state": "offload", "offload_target": "disk"}, extra={}, num_layers=4)
@example(block={"offload_target": "disk"}, extra={}, num_layers=4)
@example(block={"full_params": ["mlp"]}, extra={}, num_layers=4)
@example(block={"target": "peft", "train_outside": "always"}, extra={}, num_layers=4)
@example(block={"full_suppression": "delta"}, extra={}, num_layers=4)
@example(block={"target": "full", "train_outside": ["lm_head", ""]}, extra={}, num_layers=4)
@example(block={"verify_engine_files": 1}, extra={"verify": True}, num_layers=4)
def test_ist_block_builds_or_names_the_problem(block, extra, num_layers):
    raw = {**block, **extra}
    try:
        cfg = ISTConfig.from_dict(raw)
    except ISTConfigError as e:
        msg = str(e)
        named = _named(msg, raw, "ist")
        assert named, f"the error names no key of the block: {msg}"
        if extra:  # unknown keys are reported first, each of them
            assert all(repr(k) in msg for k in extra), msg
        # the named key is the offending one: without it, this error is gone
        assert any(_ist_error({k: v for k, v in raw.items() if k != key}) != msg for key in named), msg
        return
    assert not extra, "an unknown key was accepted"
    try:
        state = ImportanceState(num_layers, cfg)
    except ISTConfigError as e:
        assert any(k in str(e) for k in ("train_layers", "suppress_layers", "num_suppression_sets")), str(e)
        return
    assert 1 <= state.num_train <= num_layers and 1 <= state.num_suppress <= num_layers
    if cfg.strategy == "ist":
        assert state.num_sets <= math.comb(num_layers, state.num_suppress)
    assert (cfg.offload_dir is not None) == (cfg.optimizer_state == "offload" and cfg.offload_target == "disk")
    if cfg.target != "full":  # full-mode options only with target: full
        assert cfg.full_params is None and cfg.train_outside is None and cfg.full_suppression == "residual"
    assert isinstance(cfg.verify_engine_files, bool)
    assert ISTConfig.from_dict(cfg.to_dict()) == cfg


SECTION_VALUES = {
    "training": {"micro_batch_size": st.one_of(st.integers(-1, 8), junk),
                 "global_batch_size": st.one_of(st.integers(-1, 64), junk),
                 "lr": st.one_of(st.floats(-1, 1), junk), "max_grad_norm": st.one_of(st.none(), st.floats(-1, 5), junk),
                 "max_steps": st.one_of(st.integers(-1, 100), junk)},
    "peft": {"method": st.one_of(st.sampled_from(["lora", "dora", "ia3", "prefix"]), junk),
             "r": st.one_of(st.integers(-1, 64), junk), "dropout": st.one_of(st.floats(-1, 2), junk),
             "target_modules": st.one_of(st.none(), st.lists(st.sampled_from(["q_proj", "v_proj"]), max_size=2), junk)},
    "backend": {"name": st.one_of(st.sampled_from(["deepspeed", "fsdp", "single", "horovod"]), junk),
                "zero_stage": st.one_of(st.integers(-1, 4), junk), "offload_optimizer": st.one_of(st.booleans(), junk)},
    "model": {"arch": st.one_of(st.sampled_from(["llama", "gpt2", "bert"]), junk),
              "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "float16"]), junk)},
}
recipes = st.fixed_dictionaries({}, optional={
    section: st.fixed_dictionaries({}, optional=values) for section, values in SECTION_VALUES.items()})


def _recipe_error(raw: dict) -> str | None:
    try:
        Recipe.from_dict(raw)
    except ISTConfigError as e:
        return str(e)
    return None


def _without(raw: dict, section: str, key: str) -> dict:
    return {**raw, section: {k: v for k, v in raw[section].items() if k != key}}


@settings(max_examples=300, deadline=None)
@given(raw=recipes, ist=st.one_of(st.none(), ist_blocks))
def test_recipe_builds_or_names_the_problem(raw, ist):
    if ist is not None:
        raw = {**raw, "ist": ist}
    try:
        recipe = Recipe.from_dict(raw)
    except ISTConfigError as e:
        msg = str(e)
        named = [(section, key) for section in raw for key in _named(msg, raw[section], section)]
        assert named, f"the error names no section.key of the recipe: {msg}"
        assert any(_recipe_error(_without(raw, s, k)) != msg for s, k in named), msg
        return
    t = recipe.training
    assert t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size == 0 and t.lr > 0
    assert recipe.backend.name in ("deepspeed", "fsdp", "single")
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # round trip
