"""The model-family seam: a family outside the tree (``tests/toy_family.py``: renamed
parts, an untied head, an extra tensor across pipeline stages) trains through
``model.family=<import path>`` under FSDP2 x TP 2 and PP 2 with no change to
``parallel/``, equal to one process (the parity suite's tolerances: 1e-5 relative on every
step's loss and grad norm, 1e-5 absolute on every final weight). And the rules that keep
the seam honest: ``parallel/`` names no model attribute, ``pretrain/`` imports no
``torch.distributed.{tensor,fsdp,pipelining}``, no function runs over 80 lines."""
import ast
import re

import pytest
import torch

from conftest import REPO, TINY, compose_job, run_job
from test_parallel_parity import CKPT, assert_parity
from tests.toy_family import TOY_MODEL

# The toy's model file, and conftest's tiny job but the Llama fields the toy has not.
TOY = [*TOY_MODEL, *[o for o in TINY if not o.startswith(("model.n_heads=", "model.n_kv_heads="))],
       "model.tie_embeddings=false", *CKPT]


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory, tok_cache):
    d = tmp_path_factory.mktemp("toy-single")
    proc = run_job(d, [*TOY, "train.local_batch_size=4"], tok_cache=tok_cache, tiny=False)
    return d, proc


def toy_params() -> int:
    from pretrain.model.family import count_parameters
    from pretrain.validate import validate_job
    from tests.toy_family import FAMILY

    cfg = compose_job(*[o for o in TOY if not o.startswith(("checkpoint.", "logging."))],
                      "model.dim=64", "model.n_layers=2", "model.ffn_hidden_dim=128", "model.vocab_size=512")
    validate_job(cfg, 1)  # types the toy's model file by ToyArgs
    with torch.device("meta"):
        return count_parameters(FAMILY.build(cfg.model, 32))


@pytest.mark.parametrize("name,overrides,nproc", [
    ("fsdp2xtp2+sp", ["parallel=fsdp_tp", "train.local_batch_size=2"], 4),
    ("pp2-1f1b", ["parallel.pp=2", "train.local_batch_size=4"], 2),
])
def test_toy_family_trains_under_every_layout_like_one_process(name, overrides, nproc, toy_reference, tmp_path,
                                                               tok_cache):
    ref, ref_proc = toy_reference
    n = toy_params()
    # The toy, not the Llama of the same config, ran: 2 x (2 x 64 x 128 + 64) + 2 x 512 x 64 + 64.
    assert n == 2 * (2 * 64 * 128 + 64) + 2 * 512 * 64 + 64 == 98_496
    assert f"| {n:,} params |" in ref_proc.stderr + ref_proc.stdout
    run = tmp_path / name
    run_job(run, [*TOY, *overrides], tok_cache=tok_cache, nproc=nproc, launcher="torchrun", tiny=False)
    assert_parity(run, ref)


def test_overriding_model_family_alone_names_the_model_file(tmp_path):
    from pretrain.validate import ConfigError, validate_job

    cfg = compose_job("model.family=tests.toy_family:OTHER")
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1)
    assert e.value.key == "model.family"
    assert "LlamaArgs" in str(e.value) and "pick a model file" in str(e.value) and "model=other_tiny" in str(e.value)
    with pytest.raises(ConfigError, match="cannot import"):
        validate_job(compose_job("model.family=tests.nowhere:FAMILY"), 1)
    with pytest.raises(ConfigError) as e:  # the toy's args are not Llama's: its own model file feeds it
        validate_job(compose_job("model.family=tests.toy_family:FAMILY"), 1)
    assert all(s in str(e.value) for s in ("gives a LlamaArgs config", "takes ToyArgs", "model=toy")), str(e.value)
    with pytest.raises(ConfigError, match="untied head"):  # the family's own checks run
        validate_job(compose_job(*TOY_MODEL, "model.tie_embeddings=true"), 1)


@pytest.mark.parametrize("value,expected", [
    (":", "expected one of llama"), (".:x", "expected one of llama"), ("..llama:FAMILY", "expected one of llama"),
    ("llama ", "expected one of llama"), ("tests.toy_family:Block", "is a type, not a ModelFamily"),
    ("tests.toy_family_raises:FAMILY", "cannot import"), ("tests.toy_family_exits:FAMILY", "cannot import"),
])
def test_a_bad_model_family_is_a_config_error(value, expected, tmp_path, monkeypatch):
    """Whatever the value, and whatever its module does on import (raise, sys.exit), the
    answer is a ConfigError on model.family (exit 2), never a traceback or a quiet exit."""
    from pretrain.validate import ConfigError, validate_job

    pkg = tmp_path / "tests"
    pkg.mkdir()
    (pkg / "toy_family_raises.py").write_text("raise RuntimeError('broken family module')\n")
    (pkg / "toy_family_exits.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # tests.<module> found in either folder (namespace package)
    import tests

    monkeypatch.setattr(tests, "__path__", [*tests.__path__, str(pkg)])
    cfg = compose_job()
    cfg.model.family = value
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1)
    assert e.value.key == "model.family" and expected in str(e.value), str(e.value)
    assert str(e.value).startswith(f"model.family={value!r}: ")


def test_family_settings_it_cannot_take_are_config_errors():
    from pretrain.validate import ConfigError, validate_job

    cfg = compose_job(*TOY_MODEL, "model.init_from=/hf")
    with pytest.raises(ConfigError, match="no Hugging Face converter"):
        validate_job(cfg, 1)
    cfg = compose_job(*TOY_MODEL, "data.document_masking=true")
    with pytest.raises(ConfigError, match="does not support it"):
        validate_job(cfg, 1)
    cfg = compose_job()
    cfg.model = {"dim": 64}  # a model file without its schema in the defaults list
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1)
    assert e.value.key == "model" and "defaults: [llama_schema, _self_]" in str(e.value)


def test_a_family_takes_args_of_its_own_and_the_shared_fields_are_checked():
    """The contract (``FamilyArgs``): the toy's args share no base with Llama's, its model
    file (no schema: Hydra knows none for a family outside the tree) is typed by them at
    validation, naming a bad key; a family whose args lack a shared field is refused."""
    import dataclasses

    from pretrain.model.family import FAMILY_ARGS_FIELDS, ModelFamily
    from pretrain.model.llama.args import LlamaArgs
    from pretrain.validate import ConfigError, validate_job
    from tests.toy_family import FAMILY, ToyArgs

    assert set(ToyArgs.__mro__) & set(LlamaArgs.__mro__) == {object}
    cfg = compose_job(*TOY_MODEL, "model.dim=32", "model.max_position_embeddings=64", "train.seq_len=64")
    validate_job(cfg, 1)
    assert type(cfg.model) is ToyArgs and (cfg.model.dim, cfg.model.max_position_embeddings) == (32, 64)
    with pytest.raises(ConfigError) as e:  # typed: a field's type, then the shared fields' meaning
        validate_job(compose_job(*TOY_MODEL, "model.dim=wide"), 1)
    assert e.value.key == "model.dim" and "takes ToyArgs" in str(e.value)
    with pytest.raises(ConfigError, match="must be <= model.max_position_embeddings=16"):
        validate_job(compose_job(*TOY_MODEL, "model.max_position_embeddings=16", "train.seq_len=32"), 1)

    @dataclasses.dataclass
    class NoVocab:
        family: str = "x"
        name: str = "x"
        max_position_embeddings: int = 8
        init_from: str = None

    with pytest.raises(TypeError, match=r"NoVocab.*missing: vocab_size"):
        dataclasses.replace(FAMILY, args=NoVocab)
    assert set(FAMILY_ARGS_FIELDS) <= {f.name for f in dataclasses.fields(ToyArgs)}
    assert isinstance(dataclasses.replace(FAMILY, args=ToyArgs), ModelFamily)


def test_code_outside_the_families_names_no_familys_args():
    """What shared code reads from a model config is ``FamilyArgs``: no file of pretrain/
    outside a family's folder names a family's args class (``LlamaArgs``...)."""
    families = REPO / "pretrain" / "model"
    names = {"LlamaArgs", "MllamaArgs", "RopeScaling"}
    for path in sorted((REPO / "pretrain").rglob("*.py")):
        if families in path.parents and path.parent != families:
            continue  # a family's folder
        imported = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names}
        used = (_code_names(path) | imported) & names
        assert not used, f"{path.relative_to(REPO)} names {sorted(used)}: read the FamilyArgs fields, or move " \
                         "the code into the family"


def test_a_helper_package_among_the_families_is_not_one(tmp_path, monkeypatch):
    import pretrain.model as families

    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text("SHARED = 1\n")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.setattr(families, "family_names", families.family_names.__wrapped__)
    assert families.family_names() == ("llama", "mllama")  # "common" is not among them


def _code_names(path) -> set:
    """Identifiers and string constants of a file's code, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    # A config field's description (knob(..., doc=...), doc_field(default, doc)) is prose too.
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            prose = [k.value for k in n.keywords if k.arg == "doc"]
            if getattr(n.func, "id", getattr(n.func, "attr", None)) == "doc_field" and len(n.args) > 1:
                prose.append(n.args[1])
            docs |= {id(c) for v in prose for c in ast.walk(v) if isinstance(c, ast.Constant)}
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.update(re.findall(r"[A-Za-z_]+", n.value))
    return out


def test_parallel_names_no_model_attribute():
    llama = {"tok_embeddings", "layers", "attention", "feed_forward", "wq", "wk", "wv", "wo", "w1", "w2", "w3",
             "attention_norm", "ffn_norm", "rope_cos", "rope_sin"}
    for path in sorted((REPO / "parallel").glob("*.py")):
        used = _code_names(path) & llama
        assert not used, f"{path.name} names model attributes {sorted(used)}: read them from the family's layout"


def test_pretrain_imports_no_distributed_tensor_fsdp_or_pipelining():
    banned = re.compile(r"torch\.distributed\.(tensor|fsdp|pipelining)")
    for folder in ("pretrain", "data_pipeline", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for m in mods:
                    assert not banned.match(m), f"{path.relative_to(REPO)}:{node.lineno} imports {m}"


def test_no_function_over_80_lines():
    long = []
    for folder in ("pretrain", "parallel", "data_pipeline"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_an_import_path_naming_a_tree_family_is_that_family():
    """model.family=pretrain.model.llama:FAMILY trained, but its checkpoints named a family
    the export (and a resume by name) did not know: validation records the tree's name."""
    from conftest import compose_job
    from pretrain.validate import validate_job

    cfg = compose_job("model.family=pretrain.model.llama:FAMILY")
    validate_job(cfg, 1)
    assert cfg.model.family == "llama"
    cfg = compose_job(*TOY_MODEL)
    validate_job(cfg, 1)
    assert cfg.model.family == "tests.toy_family:FAMILY"  # a family outside the tree keeps its path
