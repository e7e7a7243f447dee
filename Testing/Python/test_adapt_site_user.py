"""Adapting as a site's user runs it (`cevae-anomaly adapt`, training.adapt.adapt): what is said when the output
is a file the run reads."""
from __future__ import annotations

import os
import shutil

import pytest

import CeVAEAnomalyLib.training.adapt as adapt_mod
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.checksum import sha256_of
from test_adapt import QUICK, QUICK_ARGS, site, subjects  # noqa: F401 (site: the module's fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_output_that_is_the_input_model_is_refused_as_such_not_offered_overwrite(tmp_path, tiny_bundle, site,
                                                                                      capsys):
    """--out naming the model adapted (or a link to it) was refused as "already exists ...; pass --overwrite to
    adapt again and replace it": the advice was to replace the input model (which --overwrite then refused)."""
    model = tmp_path / "base.cevae"
    shutil.copy(tiny_bundle, model)
    os.link(model, tmp_path / "linked.cevae")
    before = sha256_of(model)
    for out in (model, tmp_path / "linked.cevae"):
        with pytest.raises(CeVAEError, match="is the same file as the input") as caught:
            adapt_mod.adapt(model, subjects(site, "a", "b"), out, QUICK)
        assert "--overwrite" not in str(caught.value)
    assert main(["adapt", str(site["a"]), str(site["b"]), "--model", str(model), "--out", str(model),
                 *QUICK_ARGS]) == 2
    err = capsys.readouterr().err
    assert "same file as the input" in err and "--overwrite" not in err
    assert sha256_of(model) == before
