"""The option checks shared by every command line."""

import pickle

import pytest

from exemplar_desc.cli import EXIT_BAD_OPTION, ArgumentParser, report
from exemplar_desc.checks import OptionError, check_device, check_number, check_output_dir, check_output_file


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (0, {"low": 1, "integer": True}, "must be a whole number >= 1"),
        (2.5, {"low": 1, "integer": True}, "must be a whole number >= 1"),
        (float("nan"), {"low": 0}, "must be a finite number >= 0"),
        (float("inf"), {}, "must be a finite number"),
        (True, {}, "must be a finite number"),
        (0.0, {"low": 0, "low_open": True, "high": 1}, "must be a finite number > 0 and <= 1"),
    ],
)
def test_check_number_names_option_value_and_bounds(value, kwargs, message):
    with pytest.raises(OptionError, match=message) as info:
        check_number("--opt", value, **kwargs)
    assert str(info.value).startswith(f"--opt {value!r}: ")
    assert isinstance(info.value, ValueError)


def test_check_number_accepts_values_in_range():
    check_number("--opt", 3, low=1, integer=True)
    check_number("--opt", 0.5, low=0, high=1, low_open=True)


def test_check_device():
    assert str(check_device("--device", "cpu")) == "cpu"
    assert check_device("--device", "auto", allow_auto=True) is None
    for bad in ("gpu", "auto", "tpu:0"):
        with pytest.raises(OptionError, match="--device"):
            check_device("--device", bad)


def test_output_paths(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    assert check_output_dir("--out", tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created by a check
    with pytest.raises(OptionError, match="exists and is not a folder"):
        check_output_dir("--out", file)
    with pytest.raises(OptionError, match="is a file, so the folder cannot be created"):
        check_output_dir("--out", file / "sub")
    with pytest.raises(OptionError, match="is a folder"):
        check_output_file("--out", tmp_path)
    assert check_output_file("--out", tmp_path / "a" / "m.png") == tmp_path / "a" / "m.png"


def test_parser_error_is_one_error_line(capsys):
    parser = ArgumentParser(prog="prog")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--n", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --n: invalid int value")


def test_option_error_survives_pickling():
    """Ranks of a distributed run pass a checkpoint error on by pickling it."""
    err = pickle.loads(pickle.dumps(OptionError("resume", "runs/x", "no checkpoint there")))
    assert isinstance(err, OptionError) and (err.option, err.value, err.allowed) == ("resume", "runs/x", "no checkpoint there")
    assert str(err) == "resume 'runs/x': no checkpoint there"


def test_report_prints_a_field_under_its_flag(capsys):
    parser = ArgumentParser(prog="prog")
    parser.add_argument("--time-budget", dest="time_budget_minutes", type=float)
    parser.add_argument("images", nargs="*", metavar="IMAGES")
    assert report(OptionError("time_budget_minutes", -1.0, "must be > 0"), parser) == EXIT_BAD_OPTION
    assert report(OptionError("images", [], "no training data"), parser) == EXIT_BAD_OPTION
    assert report(OptionError("other", 1, "unknown field"), parser) == EXIT_BAD_OPTION
    assert capsys.readouterr().err.splitlines() == [
        "error: --time-budget -1.0: must be > 0", "error: IMAGES []: no training data", "error: other 1: unknown field",
    ]
