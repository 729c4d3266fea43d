"""What a run tells its user: the stages log, the command line shows it as plain lines."""

from __future__ import annotations

import logging

from morphoprof.logs import configure, progress, progress_bar, progress_enabled, set_progress


def test_configure_prints_info_and_prefixed_warnings_on_the_current_stderr(capsys):
    configure()
    configure()  # a second call replaces the handler: no line twice
    log = logging.getLogger("morphoprof.features.transfer")
    log.info("resuming: 3 of 4 shards already done")
    log.warning("skipped %s", "row 5: unreadable")
    logging.getLogger("morphoprof").debug("not shown at INFO")
    assert capsys.readouterr().err.splitlines() == [
        "resuming: 3 of 4 shards already done", "warning: skipped row 5: unreadable"]
    configure(logging.WARNING)
    log.info("hidden")
    log.warning("shown")
    assert capsys.readouterr().err == "warning: shown\n"
    configure()


def test_a_stage_logs_under_its_module_and_the_cli_shows_it(tmp_path, capsys, caplog):
    from morphoprof.cli import main
    from morphoprof.datasets.synthetic import SynthConfig, generate_screen

    cfg = SynthConfig(n_moas=2, compounds_per_moa=1, n_batches=1, plates_per_batch=1,
                      height=64, width=64)
    caplog.set_level(logging.INFO, logger="morphoprof")
    generate_screen(tmp_path / "s", cfg)
    generate_screen(tmp_path / "s", cfg)
    assert any(r.name == "morphoprof.datasets.synthetic" and "reusing" in r.getMessage()
               for r in caplog.records)
    capsys.readouterr()
    assert main(["synth", "--out", str(tmp_path / "s"), "--moas", "2", "--compounds-per-moa",
                 "1", "--batches", "1", "--plates-per-batch", "1", "--size", "64", "64"]) == 0
    printed = capsys.readouterr()
    assert "reusing synthetic screen in" in printed.err
    assert "reusing" not in printed.out


def test_one_progress_setting_hides_every_bar_and_is_restored():
    earlier = set_progress(True)
    try:
        assert not progress_bar(total=3).disable
        with progress(False):
            assert not progress_enabled() and progress_bar(range(3)).disable
            with progress(True):
                assert not progress_bar(total=3).disable
            assert progress_bar(total=3).disable
        assert progress_enabled()
    finally:
        set_progress(earlier)
