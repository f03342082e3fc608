"""The `r1fast` command's own behaviour: what it says when it cannot do what was asked."""
import pytest

from r1fast.cli import main


def test_plot_of_a_folder_that_does_not_exist_says_so(tmp_path):
    # it said "no metrics.jsonl in '...'", as if the folder were there and held no run
    missing = tmp_path / "runs" / "defualt"
    with pytest.raises(SystemExit, match=r"^r1fast plot: '.*runs/defualt' does not exist; give a run folder: the "
                                         r"output_dir of r1fast train, sft or pipeline"):
        main(["plot", str(missing)])
    with pytest.raises(SystemExit, match=r"^r1fast plot: no metrics.jsonl in"):   # there, but holding no run
        main(["plot", str(tmp_path)])
