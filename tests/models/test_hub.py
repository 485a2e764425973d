"""hf-hub: specs: parsed strictly, found anywhere in a config, fetched only on --allow-download."""

from __future__ import annotations

import argparse

import pytest

from medtune.errors import CheckpointError
from medtune.models import hub


def test_specs_are_parsed_strictly_and_found_anywhere_in_a_config():
    assert hub.split_hub_spec("hf-hub:org/name") == ("org/name", None)
    assert hub.split_hub_spec("hf-hub:org/name@v1") == ("org/name", "v1")
    for bad in ("hf-hub:name", "hf-hub:a/b/c", "hf-hub:/name"):
        with pytest.raises(CheckpointError, match="hf-hub:ORG/NAME"):
            hub.split_hub_spec(bad)
    config = {"backbone": {"pretrained": "hf-hub:a/backbone"}, "model": {"clip_weights": "hf-hub:a/clip"},
              "text": {"weights": "/local/file.pt"}, "list": ["hf-hub:a/backbone"]}
    assert list(dict.fromkeys(hub.hub_specs(config))) == ["hf-hub:a/backbone", "hf-hub:a/clip"]


def test_allow_download_fetches_the_configs_repositories_once_and_only_when_asked(monkeypatch):
    import huggingface_hub

    from medtune.cli import fetch_downloads

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, **kwargs: fetched.append((repo, revision, kwargs["allow_patterns"])))
    config = {"backbone": {"pretrained": "hf-hub:a/backbone@v2"}, "again": "hf-hub:a/backbone@v2"}
    fetch_downloads(argparse.Namespace(allow_download=False), config)
    assert fetched == []
    fetch_downloads(argparse.Namespace(allow_download=True), config)
    assert fetched == [("a/backbone", "v2", list(hub.FETCHED_PATTERNS))]

    def offline(repo, **kwargs):
        raise OSError("Name or service not known\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"^hf-hub:a/backbone@v2: cannot download \(Name or service not known\)$"):
        fetch_downloads(argparse.Namespace(allow_download=True), config)
