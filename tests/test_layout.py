"""The repository's shape: scripts import only utils and models, utils only models; and the measurement
functions every table rests on (kNN, linear probe, teacher fit) measured directly on data whose answer is known."""
import ast

import pytest
import torch

import main_distill
import main_evaluate
import pretrain
import utils
from tiny import REPO

SCRIPTS = ("pretrain.py", "main_distill.py", "main_evaluate.py")
OURS = {"pretrain", "main_distill", "main_evaluate", "utils", "models"}
ALLOWED = {**{s: {"utils", "models"} for s in SCRIPTS}, "utils.py": {"models"}, "models.py": set()}


def project_imports(path):
    """The project modules a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_no_script_imports_another(name):
    assert project_imports(REPO / name) <= ALLOWED[name], (name, project_imports(REPO / name))


def test_the_layout_check_can_fail(tmp_path):
    bad = tmp_path / "main_evaluate.py"
    bad.write_text("import json\n\ndef f():\n    import main_distill\n    from pretrain import build\n")
    assert project_imports(bad) == {"main_distill", "pretrain"}


# ---------------------------------------------------------------------------------- measurement functions
def clusters(n_per, dim=16, classes=4, spread=0.2, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3  # train and test share them
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_knn_is_right_on_separable_clusters_and_at_chance_on_noise():
    (x, y), (xt, yt) = clusters(50), clusters(20, seed=1)
    assert pretrain.knn_accuracy(x, y, xt, yt, 4, k=10, temperature=0.1) == 100.0
    g = torch.Generator().manual_seed(2)
    noise = pretrain.knn_accuracy(torch.randn(400, 16, generator=g), torch.randint(0, 4, (400,), generator=g),
                               torch.randn(400, 16, generator=g), torch.randint(0, 4, (400,), generator=g), 4, 10, 0.1)
    assert 10 < noise < 40  # chance is 25%


def test_linear_probe_separates_clusters_and_not_shuffled_labels():
    (x, y), (xt, yt) = clusters(100), clusters(50, seed=1)
    probe = {"iterations": 200, "batch_size": 64, "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0}
    assert utils.linear_probe(x, y, xt, yt, 4, probe, seed=0) == 100.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert utils.linear_probe(x, shuffled, xt, yt, 4, probe, seed=0) < 50


def test_teacher_fit_is_one_on_itself_near_zero_on_noise_and_between_for_a_noisy_copy():
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(500, 32, generator=g), torch.randn(300, 32, generator=g))
    assert main_evaluate.teacher_fit(teacher, teacher, ridge=1e-6) == pytest.approx(1.0, abs=1e-6)
    noise = (torch.randn(500, 32, generator=g), torch.randn(300, 32, generator=g))
    assert abs(main_evaluate.teacher_fit(noise, teacher, ridge=1e-3)) < 0.15
    noisy = tuple(t + torch.randn(t.shape, generator=g) for t in teacher)  # signal variance 1, noise 1: R^2 ~ 0.5
    assert 0.35 < main_evaluate.teacher_fit(noisy, teacher, ridge=1e-3) < 0.65


def test_the_frontier_tables_and_figure_are_made_from_results_files(tmp_path, capsys):
    """docs/frontier.py (make frontier-curve) reads every N<budget>/ and lever_<name>/ table it finds."""
    import json
    import sys
    sys.path.insert(0, str(REPO / "docs"))
    import frontier
    cell = lambda p, f: {"probe": p, "fit": f, "steps": 10, "time_s": 1.0}
    for folder, rows in (("N10", {"distilled": (34.0, 0.6), "init_only": (33.0, 0.5), "no_pretraining": (30.0, 0.4)}),
                         ("N100", {"distilled": (39.0, 0.8), "init_only": (38.0, 0.7), "no_pretraining": (30.0, 0.4)}),
                         ("lever_x", {"distilled": (40.0, 0.82)})):
        cells = {r: {"0": cell(*v), "1": cell(v[0] + 1, v[1])} for r, v in rows.items()}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(
            {"config": {}, "derived": {"target": "CIFAR10", "inputs": {}}, "cells": cells}))
    frontier.main([str(tmp_path), "--out", str(tmp_path / "docs")])
    printed = capsys.readouterr().out
    assert "| distilled | 34.50 ± 0.50 | 0.600 ± 0.000 | 39.50 ± 0.50 |" in printed
    assert "| distilled - init_only | +1.00 (std ≤ 0.500) |" in printed
    assert "| x | 40.50 ± 0.50 | 38.50 ± 0.50 | +2.00" in printed  # the lever against N100's init_only
    assert (tmp_path / "docs" / "frontier.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------- what utils.py holds
USERS = ("pretrain.py", "main_distill.py", "main_evaluate.py", "test_stanford_dogs.py")
FORMATS = {"save_teacher", "load_teacher", "save_distilled", "load_distilled"}  # each file format's writer beside its reader


def utils_uses(utils_src, users):
    """{top-level name of utils.py: (scripts that use utils.<name>, whether utils itself uses it)}."""
    tree = ast.parse(utils_src)
    defined = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used_by = {name: set() for name in defined}
    for script, src in users.items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "utils" \
                    and node.attr in used_by:
                used_by[node.attr].add(script)
    inside = set()  # names that code of utils.py other than their own definition refers to
    for node in tree.body:
        own = getattr(node, "name", None)
        inside |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in defined and n.id != own}
    return {name: (used_by[name], name in inside) for name in defined}


def single_script_helpers(utils_src, users):
    """Names in utils.py that one script alone uses (and utils itself does not), file formats' writers and readers
    aside."""
    return sorted(name for name, (scripts, inside) in utils_uses(utils_src, users).items()
                  if len(scripts) < 2 and not inside and name not in FORMATS)


def test_utils_holds_only_what_two_scripts_share():
    """utils.py is where the scripts meet (STYLE 9): what one script alone needs lives in that script."""
    users = {s: (REPO / s).read_text() for s in USERS}
    assert single_script_helpers((REPO / "utils.py").read_text(), users) == []


def test_the_utils_rule_can_fail():
    src = "def shared(x):\n    return helper(x)\n\n\ndef helper(x):\n    return x\n\n\ndef lonely():\n    return 1\n\n\n" \
          "def unused():\n    return 2\n"
    users = {"a.py": "import utils\nutils.shared(1)\nutils.lonely()\n", "b.py": "import utils\nutils.shared(2)\n"}
    assert single_script_helpers(src, users) == ["lonely", "unused"]
