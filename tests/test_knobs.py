"""Every knob has a range, declared beside its field (``parallel.knobs``): a walk over
every field of every config group, the model's included for each family, puts each
numeric knob out of its range (below, above, not finite, the wrong type) and expects
``validate_job`` to name that very key before any process group (in-process; one
subprocess checks exit code 2). The Hugging Face readers take the same ranges: a
``config.json`` value of 1e400, NaN or below its range is refused naming its key (exit 4
through the CLI)."""
import copy
import dataclasses
import functools
import json
import math

import pytest

from conftest import compose_job, run_job
from parallel import knobs
from pretrain.validate import ConfigError, config_warnings, validate_job

MODELS = ["model=debug", "model=mllama_debug"]
# List fields checked by a family rule (their relation to other fields), not by a range.
RULE_CHECKED = {"model.supported_aspect_ratios"}


def numeric(f: dataclasses.Field) -> bool:
    kind = f.type if isinstance(f.type, str) else str(f.type)
    return ("int" in kind or "float" in kind) and "str" not in kind


def set_key(cfg, key: str, value) -> None:
    *path, leaf = key.split(".")
    obj = cfg
    for p in path:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    setattr(obj, leaf, value)


def bad_values(rng: knobs.Range, current):
    """Values outside ``rng`` (each a list when the field is one)."""
    out = []
    step = 1 if rng.integer else 1e-3
    if rng.ge is not None:
        out.append(rng.ge - step if rng.ge - step not in dict(rng.special) else rng.ge - 2 * step)
    if rng.gt is not None:
        out.append(rng.gt)
    if rng.le is not None:
        out.append(rng.le + step)
    if rng.lt is not None:
        out.append(rng.lt)
    out += [math.nan, math.inf, "12"] if not rng.integer else [2.5, True, "12"]
    if rng.each:
        return [[v] + list(current)[1:] for v in out]
    return out


@functools.lru_cache(maxsize=None)
def composed(model: str):
    return compose_job(model, "data.mixture=[{path: a}]")  # a mixture entry: its fields are walked too


def test_every_numeric_knob_declares_its_range():
    for model in MODELS:
        missing = [key for key, f, _ in knobs.walk(composed(model))
                   if numeric(f) and knobs.range_of(f) is None and key not in RULE_CHECKED]
        assert not missing, missing


@pytest.mark.parametrize("model", MODELS)
def test_every_knob_out_of_its_range_is_a_config_error_naming_it(model):
    """The table: every ranged field of every group (the model's by its family), each
    value outside the range on its own, through ``validate_job``."""
    validate_job(copy.deepcopy(composed(model)), 1)  # the defaults are valid
    checked, wrong = 0, []
    for key, f, current in knobs.walk(composed(model)):
        rng = knobs.range_of(f)
        if rng is None:
            continue
        for value in bad_values(rng, current):
            cfg = copy.deepcopy(composed(model))
            set_key(cfg, key, value)
            try:
                validate_job(cfg, 1)
                wrong.append((key, value, "accepted"))
            except ConfigError as e:
                if e.key != key:
                    wrong.append((key, value, str(e)))
            checked += 1
    assert not wrong, wrong
    assert checked > 150, checked


def test_an_out_of_range_value_exits_2_before_training(tmp_path, tok_cache):
    proc = run_job(tmp_path, ["optim.lr=inf"], tok_cache=tok_cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: optim.lr=inf: expected a finite number > 0" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_legal_values_that_are_probably_mistakes_are_warned_naming_the_key():
    cfg = compose_job("optim.lr=30000", "model.init_std=2")
    validate_job(cfg, 1)  # legal
    assert [w.split("=")[0] for w in config_warnings(cfg)] == ["model.init_std", "optim.lr"]
    assert config_warnings(compose_job()) == []


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tests.test_hf_io import save_hf

    path = tmp_path_factory.mktemp("hf") / "hf"
    save_hf(path, tied=True, seed=0)
    return path


def edited(src, dst, field: str, raw: str):
    """A copy of the HF folder ``src`` whose config.json has ``raw`` (JSON text) at ``field``."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    # transformers 5 writes the RoPE settings in rope_parameters (theta and the scaling)
    rope = field == "rope_theta" or field.startswith("rope_scaling.")
    (cfg["rope_parameters"] if rope else cfg)[field.rsplit(".", 1)[-1]] = "@@"
    (dst / "config.json").write_text(json.dumps(cfg).replace('"@@"', raw))
    return dst


@pytest.mark.parametrize("field,raw", [("rms_norm_eps", "NaN"), ("rms_norm_eps", "-1e-05"),
                                       ("rope_theta", "1e400"), ("hidden_size", "1e400"),
                                       ("num_hidden_layers", "-2"), ("intermediate_size", "12.5"),
                                       ("rope_scaling.original_max_position_embeddings", "1e400"),
                                       ("rope_scaling.low_freq_factor", "0")])
def test_hf_config_values_out_of_range_are_refused_naming_the_key(hf_folder, tmp_path, field, raw):
    from pretrain.checkpoint import CheckpointError
    from pretrain.hf import HFWeights

    folder = edited(hf_folder, tmp_path / "hf", field, raw)
    with pytest.raises(CheckpointError, match=rf"config.json: {field} \(model\.[a-z_.]+\)=") as e:
        HFWeights(folder).args()
    assert "expected" in str(e.value)


def test_an_out_of_range_hf_config_value_exits_4(hf_folder, tmp_path):
    from tests.test_hf_io import cli

    proc = cli("import", edited(hf_folder, tmp_path / "hf", "rms_norm_eps", "NaN"), tmp_path / "out", check=False)
    assert proc.returncode == 4 and "rms_norm_eps (model.norm_eps)=nan" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
