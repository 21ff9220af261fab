"""Property-based checks of config validation: any input either builds or raises ISTConfigError.

Random ``ist`` blocks and training recipes, mixing valid values, wrong types, out-of-range numbers,
unknown keys and contradictory options. Whatever comes in, validation never crashes with another
exception type, a rejected config names the offending key, and an accepted one is consistent.
"""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ist_ds.core import ISTConfig, ImportanceState
from ist_ds.errors import ISTConfigError
from ist_ds.recipe import Recipe

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
}

ist_blocks = st.fixed_dictionaries({}, optional=IST_VALUES)
extra_keys = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in IST_VALUES), junk, max_size=1)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=ist_blocks, extra=extra_keys, num_layers=st.integers(1, 12))
def test_ist_block_builds_or_names_the_problem(block, extra, num_layers):
    raw = {**block, **extra}
    try:
        cfg = ISTConfig.from_dict(raw)
    except ISTConfigError as e:
        msg = str(e)
        assert any(k in msg or repr(k) in msg for k in raw), msg  # the message names a key of the block
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


@settings(max_examples=300, deadline=None)
@given(raw=recipes, ist=st.one_of(st.none(), ist_blocks))
def test_recipe_builds_or_names_the_problem(raw, ist):
    if ist is not None:
        raw = {**raw, "ist": ist}
    try:
        recipe = Recipe.from_dict(raw)
    except ISTConfigError as e:
        assert str(e)
        return
    t = recipe.training
    assert t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size == 0 and t.lr > 0
    assert recipe.backend.name in ("deepspeed", "fsdp", "single")
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # round trip
