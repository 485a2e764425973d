"""medtune's test suite: its folders mirror the package's, each one a package so that files
of the same name in two folders (``data/test_referring.py``, ``finetune/referring/...``)
import as two modules (``tests.data.test_referring``, ...)."""

from pathlib import Path

#: the repository root: configs/, scripts/ and the medtune/ package lie here
REPO = Path(__file__).resolve().parents[1]
