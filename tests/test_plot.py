"""qplan plot and suggest --plot: the curves' data, the pictures, the errors."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.plot import draw, memory_curves
from qplan.profiles.gpus import GIB


def test_curves_hold_the_suggested_settings_and_cross_the_limit_where_said():
    m = api.get_model("llama-3.1-8b")
    cards = [api.get_gpu("rtx-4060"), api.get_gpu("rtx-4090")]
    data = memory_curves(m, cards, seq_len=2048)
    for c, g in zip(data.curves, cards):
        plan = api.suggest(m, g, seq_len=2048)
        assert c.settings == plan.config and c.point == (2048, round(plan.peak_gib, 3))
        assert list(c.peak_gib) == sorted(c.peak_gib)  # longer sequences never need less
        est = api.estimate(m, g, plan.config.with_(seq_len=c.seq[0]))
        assert c.peak_gib[0] == round(est.memory.peak_bytes / GIB, 3)
        i = c.seq.index(c.longest_fit)
        assert c.peak_gib[i] <= c.usable_gib and (i + 1 == len(c.seq) or c.peak_gib[i + 1] > c.usable_gib)


def test_a_card_that_fits_nothing_at_the_sequence_gets_the_longest_plan():
    m = api.get_model("llama-3.1-8b")
    short, none = memory_curves(m, [api.get_gpu("rtx-4060"), api.get_gpu("3GB")], seq_len=65536).curves
    assert short.point is not None and short.point[0] < 65536 and "nothing fits at 65536" in short.note
    assert none.point is None and none.longest_fit is None and "nothing fits this card" in none.note


@pytest.mark.parametrize("suffix, magic", [(".png", b"\\x89PNG"), (".svg", b"<?xml")])
def test_pictures_are_written(tmp_path, suffix, magic):
    data = memory_curves(api.get_model("llama-3.2-1b"), [api.get_gpu("t4")], seq_len=1024)
    p = draw(data, tmp_path / f"m{suffix}")
    assert p.read_bytes()[:5].startswith(magic.decode("unicode_escape").encode("latin-1"))


def test_plot_and_suggest_plot_commands(tmp_path):
    r = CliRunner().invoke(cli, ["plot", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--gpu",
                                 "rtx-4090", "--seq", "1024", "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert "rtx-4060 (8 GiB): recommended 1,024 tokens" in r.output
    r = CliRunner().invoke(cli, ["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4060",
                                 "--plot", str(tmp_path / "s.svg"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["plot"] == str(tmp_path / "s.svg")
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("args, match", [
    (["plot", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "-o", "x.jpg"], "must end in .png or .svg"),
    (["suggest", "--model", "llama-3.1-8b", "--gpu", "rtx-4060", "--plot", "x.pdf"], "must end in .png or .svg"),
    (["plot", "--model", "llama-3.1-8b", "--gpu", "rtx-9999", "-o", "x.png"], "rtx-9999"),
    (["plot", "--model", "llama-3.1-8b", "-o", "x.png"], "Missing option '--gpu'"),
])
def test_bad_plot_requests_exit_2(args, match):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output


def test_without_matplotlib_the_message_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = CliRunner().invoke(cli, ["plot", "--model", "llama-3.2-1b", "--gpu", "t4", "-o",
                                 str(tmp_path / "m.png")])
    assert r.exit_code == 2 and "pip install 'qplan[plot]'" in r.output
