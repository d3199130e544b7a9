"""What a verb shows: progress lines by default, `-q` only the summary, warnings and errors, `-v`
debug lines too; a library call shows no progress unless its caller configures logging."""

from __future__ import annotations

import json
import logging
import os

from pairmill.cli import main
from tests.conftest import literal_pairs, write_jsonl


def test_quiet_and_verbose_choose_what_a_verb_prints(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "heldout.jsonl", literal_pairs(20) + ["not json"])
    runs = {}
    for flag in ("", "-q", "-v"):
        assert main(["eval", "--model", tiny_model, "--data", str(data), *flag.split()]) == 0
        runs[flag] = capsys.readouterr()
    progress = "[pairmill] eval: 20 queries against 20 passages"
    debug = "[pairmill] eval: encoder "
    warning = "[pairmill] eval: " + str(data) + ": 1 of 21 rows left out as invalid"
    default, quiet, verbose = runs[""], runs["-q"], runs["-v"]
    assert progress in default.out and warning in default.out and debug not in default.out
    assert "encode query" in default.err  # the encode progress bar
    assert progress not in quiet.out and "encode query" not in quiet.err
    assert warning in quiet.out and "ndcg@10" in quiet.out  # warnings and the summary table stay
    assert progress in verbose.out and debug in verbose.out


def test_a_library_call_prints_no_progress_unless_configured(tmp_path, capsys, caplog):
    from pairmill.chain.run import Stages
    from pairmill.log import configure

    def job(folder: str) -> dict:
        os.makedirs(folder)
        (tmp_path / "s" / "stats.json").write_text(json.dumps({"rows": 1}))
        (tmp_path / "s" / "_SUCCESS").write_text("")
        return {"rows": 1}

    Stages(tmp_path, force=False).run("s", "k", job)
    Stages(tmp_path, force=False).run("s", "k", job)  # reused: an INFO line
    assert capsys.readouterr().out == "" and not caplog.records
    configure(logging.INFO)
    Stages(tmp_path, force=False).run("s", "k", job)
    assert "[pairmill] run: s: reusing " in capsys.readouterr().out
