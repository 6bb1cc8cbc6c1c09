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
        out.append(rng.le + max(step, abs(rng.le)))  # past it also where a float's step would round away
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
    assert "config error: optim.lr=inf: expected a finite number in (0, 1e+30]" in proc.stderr
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


@pytest.mark.parametrize("field,raw,named", [
    ("rms_norm_eps", "NaN", "rms_norm_eps (model.norm_eps)=nan"),
    ("rms_norm_eps", "-1e-05", "rms_norm_eps (model.norm_eps)=-1e-05"),
    ("rope_theta", "1e400", "rope_theta (model.rope_theta)=inf"),
    ("num_hidden_layers", "-2", "num_hidden_layers (model.n_layers)=-2"),
    ("rope_scaling.low_freq_factor", "0", "rope_scaling.low_freq_factor (model.rope_scaling.low_freq_factor)=0"),
    # values of the wrong type, named by the reader before any arithmetic on them
    ("hidden_size", "1e400", "hidden_size=inf: expected an integer"),
    ("intermediate_size", "12.5", "intermediate_size=12.5: expected an integer"),
    ("num_attention_heads", '"4"', "num_attention_heads='4': expected an integer"),
    ("rope_scaling.original_max_position_embeddings", "1e400",
     "rope_parameters.original_max_position_embeddings=inf: expected an integer"),
    ("rope_scaling.factor", '"x"', "rope_parameters.factor='x': expected a number"),
    # bool("false") is True: an untied head read as tied was dropped without a word
    ("tie_word_embeddings", '"false"', "tie_word_embeddings='false': expected true or false"),
])
def test_hf_config_values_out_of_range_are_refused_naming_the_key(hf_folder, tmp_path, field, raw, named):
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.hf import HFWeights

    folder = edited(hf_folder, tmp_path / "hf", field, raw)
    with pytest.raises(CheckpointError, match=r"config.json: ") as e:
        HFWeights(folder).args()
    assert named in str(e.value) and "expected" in str(e.value), str(e.value)


def test_two_rope_bases_in_one_hf_config_are_refused(hf_folder, tmp_path):
    """rope_theta at the top and in rope_parameters disagreeing: the top one was taken,
    silently. Which the weights were trained with is not known: refused naming both."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.hf import HFWeights

    import shutil

    shutil.copytree(hf_folder, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"] / 50
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"rope_theta=10000.0 and rope_parameters.rope_theta=500000.0 disagree"):
        HFWeights(tmp_path / "hf").args()


def test_an_out_of_range_hf_config_value_exits_4(hf_folder, tmp_path):
    from tests.test_hf_io import cli

    proc = cli("import", edited(hf_folder, tmp_path / "hf", "rms_norm_eps", "NaN"), tmp_path / "out", check=False)
    assert proc.returncode == 4 and "rms_norm_eps (model.norm_eps)=nan" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
