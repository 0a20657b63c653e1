"""Config: every YAML matches utils.SCHEMA, errors name the file and the dotted key (STYLE 3)."""
import re

import pytest
import yaml

import utils
from tiny import REPO, set_dotted

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCRIPTS = [REPO / s for s in ("pretrain.py", "main_distill.py", "main_evaluate.py")]


def write_variant(tmp_path, edit, name="variant.yaml"):
    """Load configs/cifar10.yaml, apply `edit(cfg)` and write it to tmp_path."""
    cfg = yaml.safe_load((REPO / "configs" / "cifar10.yaml").read_text())
    edit(cfg)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_configs_present():
    """One config per dataset (pretrain.py's default), plus variants named <dataset>_<setting>."""
    stems = {p.stem for p in CONFIGS}
    assert {d.lower() for d in utils.DATASETS} <= stems
    assert "cifar10_cpu" in stems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    """Each config matches the schema and names its own dataset."""
    cfg = utils.load_config(path)
    assert path.stem == cfg["dataset"].lower() or path.stem.startswith(cfg["dataset"].lower() + "_")
    assert set(cfg) == set(utils.SCHEMA)
    assert isinstance(cfg["pretrain"]["weight_decay"], float)
    assert all(isinstance(a, int) and a % 90 == 0 for a in cfg["augmentations"]["rotate"])


def test_unknown_key(tmp_path):
    path = write_variant(tmp_path, lambda c: c["distillation"].update(stepz=3))
    with pytest.raises(utils.ConfigError, match=r"variant\.yaml.*distillation\.stepz"):
        utils.load_config(path)


def test_unknown_section(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(extra={"a": 1}))
    with pytest.raises(utils.ConfigError, match=r"variant\.yaml.*'extra'"):
        utils.load_config(path)


def test_missing_key(tmp_path):
    path = write_variant(tmp_path, lambda c: c["model_pool"].pop("inner_loop_steps_Z"))
    with pytest.raises(utils.ConfigError, match=r"variant\.yaml.*missing key 'model_pool\.inner_loop_steps_Z'"):
        utils.load_config(path)


@pytest.mark.parametrize("dotted,value", [
    ("distillation.steps", "many"),      # a string for an int
    ("distillation.steps", 3.5),         # a float for an int
    ("evaluation.epochs", True),         # a bool for an int
    ("pretrain.lr", True),               # a bool for a float
    ("pretrain.lr", "fast"),             # a non-numeric string for a float
    ("pretrain.compile", 1),             # an int for a bool
    ("data.root", 5),                    # an int for a str
    ("distillation.method", "other"),    # not one of the choices
    ("pretrain.crop_scale", 0.5),        # a scalar for a list
    ("model_pool.widths", [128, "x"]),   # a bad list element
    ("dataset", "MNIST"),                # an unknown dataset
])
def test_mistyped_value(tmp_path, dotted, value):
    """A mistyped entry raises naming the file and the dotted key."""
    path = write_variant(tmp_path, lambda cfg: set_dotted(cfg, dotted, value))
    with pytest.raises(utils.ConfigError, match=rf"variant\.yaml: {re.escape(dotted)}"):
        utils.load_config(path)


def test_section_not_a_mapping(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(probe=3))
    with pytest.raises(utils.ConfigError, match=r"variant\.yaml.*probe"):
        utils.load_config(path)


def test_scientific_notation_is_float(tmp_path):
    """PyYAML reads `1e-4` as a string; load_config makes it a float."""
    text = (REPO / "configs" / "cifar10.yaml").read_text()
    text, n = re.subn(r"(\n  weight_decay:) 1\.0e-4", r"\1 1e-4", text, count=1)
    assert n == 1
    text, n = re.subn(r"\n  lr_image: 1\.0e-2", "\n  lr_image: 5e-3", text, count=1)
    assert n == 1
    path = tmp_path / "sci.yaml"
    path.write_text(text)
    raw = yaml.safe_load(text)
    assert raw["pretrain"]["weight_decay"] == "1e-4" and raw["distillation"]["lr_image"] == "5e-3"
    cfg = utils.load_config(path)
    assert cfg["pretrain"]["weight_decay"] == pytest.approx(1e-4) and type(cfg["pretrain"]["weight_decay"]) is float
    assert cfg["distillation"]["lr_image"] == pytest.approx(5e-3)


def test_missing_file(tmp_path):
    with pytest.raises(utils.ConfigError, match="nope.yaml"):
        utils.load_config(tmp_path / "nope.yaml")


def test_overrides():
    """Dotted overrides are parsed as YAML and pass the same checks."""
    ov = utils.parse_overrides(["--distillation.steps=200", "--pretrain.lr=1e-3", "--model_pool.widths=[8,16]",
                                "--distillation.real_views=identity"])
    assert ov == {"distillation.steps": 200, "pretrain.lr": "1e-3", "model_pool.widths": [8, 16],
                  "distillation.real_views": "identity"}
    cfg = utils.load_config(REPO / "configs" / "cifar10.yaml", ov)
    assert cfg["distillation"]["steps"] == 200
    assert cfg["pretrain"]["lr"] == pytest.approx(1e-3)
    assert cfg["model_pool"]["widths"] == [8, 16]
    assert cfg["distillation"]["real_views"] == "identity"
    assert utils.load_config(REPO / "configs" / "cifar10.yaml")["distillation"]["steps"] == 30000


@pytest.mark.parametrize("item,pattern", [
    ("--distillation.stepz=3", r"cifar10\.yaml.*distillation\.stepz"),
    ("--distilation.steps=3", r"cifar10\.yaml.*distilation"),
    ("--distillation.steps=abc", r"cifar10\.yaml: distillation\.steps"),
    ("--pretrain.lr=true", r"cifar10\.yaml: pretrain\.lr"),
    ("--steps=3", r"cifar10\.yaml.*unknown key 'steps'"),
])
def test_bad_override(item, pattern):
    with pytest.raises(utils.ConfigError, match=pattern):
        utils.load_config(REPO / "configs" / "cifar10.yaml", utils.parse_overrides([item]))


@pytest.mark.parametrize("item", ["distillation.steps=3", "--distillation.steps"])
def test_malformed_override(item):
    with pytest.raises(utils.ConfigError, match="override"):
        utils.parse_overrides([item])


def test_top_level_override():
    cfg = utils.load_config(REPO / "configs" / "cifar10.yaml", utils.parse_overrides(["--seed=3"]))
    assert cfg["seed"] == 3


def test_an_option_prefix_does_not_swallow_a_config_override():
    """argparse's prefix matching read main_evaluate's --seed=1 as --seeds=1 and dropped the override."""
    import main_distill
    import main_evaluate
    import pretrain
    args, ov = main_evaluate.parse_args(["--config", "c.yaml", "--seed=1", "--seeds", "3"])
    assert ov == {"seed": 1} and args.seeds == 3
    args, ov = pretrain.parse_args(["DIGITS", "--epoch=3"])  # not --epochs: an unknown config key, an error later
    assert ov == {"epoch": 3} and args.epochs is None
    args, ov = main_distill.parse_args(["--config", "c.yaml", "--teach=t.pth"])
    assert ov == {"teach": "t.pth"} and args.teacher is None


def _read_somewhere(dotted, text):
    key = dotted.split(".")[-1]
    return dotted in text or f'["{key}"]' in text or f"['{key}']" in text


def test_dead_key_check_can_fail():
    """The dead-key rule below rejects a key that no file reads."""
    assert _read_somewhere("distillation.steps", 'cfg["distillation"]["steps"]')
    assert not _read_somewhere("distillation.steps", '"steps": int')


@pytest.mark.skipif(not all(p.is_file() for p in SCRIPTS), reason="the three scripts are not written yet")
def test_no_dead_keys():
    """Every schema key is read by a script or utils.py (STYLE 3: dead keys stay at zero)."""
    text = "\n".join(p.read_text() for p in SCRIPTS + [REPO / "utils.py"])
    dead = [k for k in utils.leaves() if not _read_somewhere(k, text)]
    assert not dead, f"schema keys no file reads: {dead}"
