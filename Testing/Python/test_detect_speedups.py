"""Savings on the detection path give the same outputs, bit for bit, as the plain computation they replace."""
import torch

from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.scoring import network_maps, scoring_copy
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.options import SCORE_TYPES


def _maps(maps):
    return (maps.rec, maps.grad, maps.attribution, maps.brain, maps.slices.kl, maps.slices.rec, maps.slices.neg_elbo)


def test_scoring_without_weight_gradients_gives_the_same_maps_and_leaves_the_model_trainable():
    bundle = load_bundle(default_model_path(), "cpu")
    detector = Detector(bundle)
    scan = detector.prepared(read_image(data_path("colin27_t1_2mm.nii.gz")),
                             read_image(data_path("colin27_brainmask_2mm.nii.gz")))
    options = [detector.score.replace(score_type=t) for t in SCORE_TYPES]
    options += [detector.score.replace(grad_target="elbo"), detector.score.replace(combi="attribution")]
    frozen = scoring_copy(bundle.model)
    for stack in scan.stacks[:1]:
        slices, brain = torch.from_numpy(stack.slices), torch.from_numpy(stack.brain)
        for opts in options:
            plain = network_maps(bundle.model, slices, brain, [opts], batch_size=64)
            fast = network_maps(frozen, slices, brain, [opts], batch_size=64)
            for a, b in zip(_maps(plain), _maps(fast)):
                assert (a is None and b is None) or torch.equal(a, b)
    assert all(p.requires_grad for p in bundle.model.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
