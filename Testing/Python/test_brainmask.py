"""Automatic brain mask: accuracy on a real head, exact output geometry, clear errors."""
from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1, compute_brain_mask, default_template_dir
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.sampledata import find_healthy_data, subject_files

from conftest import REPO, oblique_direction


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    return 2.0 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


def assert_same_grid(mask: sitk.Image, image: sitk.Image) -> None:
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


@pytest.fixture(scope="module")
def robex():
    """(T1, reference mask) of the real robex head (with skull), 1.5 mm."""
    folder = find_healthy_data(("robex",))
    if folder is None:
        pytest.skip("healthy sample data not found (../shared/data/healthy or $CEVAE_DATA_DIR); "
                    "run scripts/fetch_data.py DEST and set CEVAE_DATA_DIR=DEST")
    t1, mask = subject_files(folder, "robex")
    return sitk.ReadImage(str(t1)), sitk.ReadImage(str(mask))


@pytest.fixture(scope="module")
def template_head():
    """(the bundled template head, its automatic mask, the warnings that mask was made with): one registration
    for the tests that compare another run of that head with an undisturbed one (the mask is the same every time,
    see test_same_head_gives_the_same_mask_every_time). Tests must not modify these images."""
    import logging

    from CeVAEAnomalyLib.engine.brainmask import load_template

    head, _ = load_template()
    warnings: list = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        mask = compute_brain_mask(head)
    finally:
        logging.getLogger().removeHandler(handler)
    return head, mask, warnings


def test_template_is_bundled():
    for name in (TEMPLATE_T1, TEMPLATE_MASK):
        assert (default_template_dir() / name).is_file()


@pytest.fixture(scope="module")
def robex_mask(robex):
    """(the automatic mask of the robex head, the progress reports it was made with: (fraction, message) pairs),
    shared by the tests that look at one undisturbed run. Tests must not modify the mask."""
    calls: list = []
    mask = compute_brain_mask(robex[0], progress=lambda fraction, message: calls.append((fraction, message)))
    return mask, calls


def test_real_head_mask_matches_reference(robex, robex_mask):
    image, reference = robex
    mask, reports = robex_mask
    calls = [fraction for fraction, _ in reports]
    assert_same_grid(mask, image)
    assert dice(mask, reference) >= 0.85
    assert calls[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in calls) and calls == sorted(calls)


def test_same_head_gives_the_same_mask_every_time(robex, robex_mask):
    """The registration samples its metric with a fixed seed on one thread: repeated runs agree voxel for voxel
    (with ITK's thread pool they differed by a few hundred voxels)."""
    image, _ = robex
    first, second = sitk.GetArrayFromImage(robex_mask[0]), sitk.GetArrayFromImage(compute_brain_mask(image))
    assert first.any()
    np.testing.assert_array_equal(first, second)


def test_oblique_grid_keeps_geometry(robex):
    image, reference = robex
    grid = sitk.Image([100, 110, 96], sitk.sitkUInt8)
    grid.SetSpacing((1.9, 1.7, 2.1))
    grid.SetDirection(oblique_direction(25.0))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    half = np.array(grid.GetDirection()).reshape(3, 3) @ ((np.array(grid.GetSize()) - 1) / 2 * grid.GetSpacing())
    grid.SetOrigin(tuple(centre - half + 0.37))
    oblique = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = compute_brain_mask(oblique)
    assert_same_grid(mask, oblique)
    truth = sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assert dice(mask, truth) >= 0.85


def test_skull_stripped_input_uses_its_foreground(robex):
    image, reference = robex
    stripped = sitk.Mask(image, reference)
    mask = compute_brain_mask(stripped)
    assert_same_grid(mask, stripped)
    assert dice(mask, reference) >= 0.97


@pytest.mark.parametrize("image", [
    sitk.Image([8, 8], sitk.sitkFloat32),
    sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3),
    sitk.Image([8, 8, 8], sitk.sitkFloat32),
], ids=["2d", "vector", "constant"])
def test_unusable_input_is_a_clear_error(image):
    with pytest.raises(CeVAEError):
        compute_brain_mask(image)


def test_missing_template_is_a_clear_error(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32))
    image.SetSpacing((5.0, 5.0, 5.0))  # 8 L of noisy foreground: a head, so the template is needed
    with pytest.raises(CeVAEError, match="make_template"):
        compute_brain_mask(image, template_dir=tmp_path)


def test_registration_reports_every_iteration_and_cancels_at_once(robex, robex_mask):
    """Progress keeps moving during the registration (every stage reports each optimiser iteration, so nothing
    freezes however loaded the machine), and a cancel stops it."""
    from collections import Counter

    from CeVAEAnomalyLib.progress import Cancelled

    image, _ = robex
    calls = robex_mask[1]
    registering = [(f, m) for f, m in calls if 0.1 < f < 0.8]
    assert len(registering) > 100  # one report per optimiser iteration, not one per stage
    stages = Counter(m for _, m in registering if m.startswith("Registering brain template ("))
    assert len(stages) == 3 and min(stages.values()) > 10, stages  # initial pose, similarity, affine: each moves
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions)  # never backwards

    seen = []

    def cancel(fraction, message):
        seen.append(fraction)
        if fraction > 0.3:
            raise Cancelled("Cancelled by the user.")

    with pytest.raises(Cancelled):
        compute_brain_mask(image, progress=cancel)
    assert sum(f > 0.3 for f in seen) == 1  # no further iteration reported after the cancel


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("sender", ["callback", "thread"])
@pytest.mark.parametrize("stage", ["initial pose", "similarity"])  # one level; two (a stop must end both)
def test_a_stop_signal_during_the_registration_is_raised_as_itself(signum, sender, stage):
    """Ctrl-C or SIGTERM arriving while ITK registers stops the registration at once and comes out as the stop,
    not as a failed registration (which made `detect` exit 2 with a traceback and `batch` carry on to the next
    volume). ``callback``: sent from the progress callback; ``thread``: sent from another thread, so that it
    mostly arrives while ITK's C++ runs and its handler runs on entry to the next Python callback."""
    from CeVAEAnomalyLib.interrupts import Terminated, sigterm_as_interrupt
    from CeVAEAnomalyLib.engine.brainmask import load_template

    head, _ = load_template()  # a real head: the bundled template
    after: list = []  # reports after the signal was sent
    sent = threading.Event()

    def send() -> None:
        sent.set()
        os.kill(os.getpid(), signum)

    def progress(fraction, message):
        if sent.is_set():
            after.append(message)
        elif message == f"Registering brain template ({stage})" and not hasattr(progress, "started"):
            progress.started = True
            if sender == "callback":
                send()
            else:
                threading.Timer(0.05, send).start()

    expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    with sigterm_as_interrupt(), pytest.raises(expected):
        compute_brain_mask(head, progress=progress)
    assert sent.is_set() and len(after) <= 1  # at most the iteration under way is reported


def test_an_ignored_ctrl_c_leaves_the_registration_alone(template_head):
    """A process that ignores Ctrl-C (a pool worker, a job started with `&` from a script) gets the mask of an
    undisturbed run, not one cut short by the stop it ignores."""
    head, undisturbed, _ = template_head

    def ctrl_c_once(fraction, message):
        if message.startswith("Registering brain template (") and not hasattr(ctrl_c_once, "sent"):
            ctrl_c_once.sent = True
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        mask = compute_brain_mask(head, progress=ctrl_c_once)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ctrl_c_once.sent and np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(undisturbed))


def test_the_same_head_stored_in_another_voxel_order_gets_the_same_mask(template_head):
    """The registration samples by voxel index and averages blocks from index 0: a NIfTI's LAS and an NRRD's RAS
    copy of one scan got masks 46-50 ml apart, and so other score maps. The mask is made in one order now."""
    head, reference_mask, _ = template_head
    order = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(head.GetDirection())
    reference = sitk.GetArrayFromImage(reference_mask)
    for other in {"RAS", "LPI", "SAL"} - {order}:  # flipped axes, and permuted ones
        stored = sitk.DICOMOrient(head, other)
        mask = compute_brain_mask(stored)
        assert_same_grid(mask, stored)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(mask, order)), reference)


def test_a_start_that_fails_is_passed_over(template_head, monkeypatch, caplog):
    """Nine starts now (shifted ones included): one that ITK cannot run (here a start 5 m away, whose samples all
    fall outside the template) is passed over instead of failing the whole mask."""
    import logging

    import CeVAEAnomalyLib.engine.brainmask as brainmask

    head, reference_mask, _ = template_head
    reference = sitk.GetArrayFromImage(reference_mask)
    monkeypatch.setattr(brainmask, "_SHIFT_STARTS_MM", (*brainmask._SHIFT_STARTS_MM, 5000.0))
    with caplog.at_level(logging.DEBUG, logger="CeVAEAnomalyLib.engine.brainmask"):
        mask = compute_brain_mask(head)
    assert "failed" in caplog.text
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), reference)


def test_a_float64_scan_in_tiny_units_is_masked_like_the_scan(template_head):
    """Cast to float32 for the registration, every voxel of a scan in units of 1e-50 became 0 ("this image is
    constant"); like a huge one, it is scaled by a power of two first."""
    head, mask, _ = template_head
    tiny = sitk.Cast(head, sitk.sitkFloat64) * 1e-50
    np.testing.assert_array_equal(sitk.GetArrayFromImage(compute_brain_mask(tiny)), sitk.GetArrayFromImage(mask))


def _acquisition(name: str, recipe, seed: int, air_zeroed: bool = False):
    """(image, reference mask) of the real ``name`` volume turned into an acquisition (a variant name of
    ``VARIANTS`` or a ``Recipe``), the reference mask degraded alike; ``air_zeroed``: the scan's air set to 0 first
    (scripts/eval_brainmask.py's ``zero_air``, on the path)."""
    from CeVAEAnomalyResearch.acquisition import VARIANTS, derive

    folder = find_healthy_data((name,))
    if folder is None:
        pytest.skip("healthy sample data not found (../shared/data/healthy or $CEVAE_DATA_DIR)")
    t1, mask = (sitk.ReadImage(str(p)) for p in subject_files(folder, name))
    if air_zeroed:
        from eval_brainmask import zero_air

        t1 = zero_air(t1)
    recipe = VARIANTS[recipe] if isinstance(recipe, str) else recipe
    image, reference, _ = derive(recipe, t1, mask, sitk.Image(mask.GetSize(), sitk.sitkUInt8), seed)
    return image, reference


def test_head_with_partial_coverage_is_not_taken_for_a_skull_stripped_brain():
    """robex (with skull) with the lower 40 % of its brain cut off: its foreground (2.5 L) is brain-sized, but
    its air is noise, not a stripped image's constant background, so the template is registered (taking it for
    a stripped brain made the whole head the mask: Dice 0.53)."""
    from CeVAEAnomalyResearch.acquisition import Recipe

    image, reference = _acquisition("robex", Recipe(crop=("bottom", 0.4)), seed=15)
    mask = compute_brain_mask(image)
    assert_same_grid(mask, image)
    assert dice(mask, reference) >= 0.9


def test_skull_stripped_brain_with_noise_added_everywhere_is_registered():
    """mni152 (skull-stripped) with 3 % Rician noise over the whole volume: its background is noise, so it is
    masked like a head (taking it for a stripped brain let the noise join the foreground: a 4 L mask)."""
    image, reference = _acquisition("mni152", "noise 3 %", seed=7)
    mask = compute_brain_mask(image)
    assert_same_grid(mask, image)
    assert dice(mask, reference) >= 0.9


def test_clinical_thick_post_contrast_head_keeps_its_mask():
    """robex (with skull) as a clinical scan: simulated post-contrast, 6.5 mm axial slabs, 3 % noise."""
    image, reference = _acquisition("robex", "clinical: post-contrast, 6.5 mm, noise 3 %", seed=13)
    mask = compute_brain_mask(image)
    assert_same_grid(mask, image)
    assert dice(mask, reference) >= 0.9


@pytest.mark.parametrize("air", ["noise", "zero"])
def test_a_head_with_its_upper_half_cut_off_gets_a_start_shifted_along_its_axis(air: str, monkeypatch):
    """robex with the top 50 % of its brain cut off: its centre of mass lies low in the head, far from the whole
    template's, and no pitched start reached the right pose (Dice 0.71, 316 ml of leak); a start shifted down does.
    The same with its air set to 0 (a masked export)."""
    from CeVAEAnomalyResearch.acquisition import Recipe

    if air == "zero":
        monkeypatch.syspath_prepend(str(REPO / "scripts"))
    image, reference = _acquisition("robex", Recipe(crop=("top", 0.5)), seed=16, air_zeroed=air == "zero")
    assert dice(compute_brain_mask(image), reference) >= 0.88


def test_a_mask_that_cannot_be_trusted_is_said_so(template_head, caplog):
    """The bundled colin27 head (with skull, air exactly 0): whole, it is masked without a word; one hemisphere
    passes for a skull-stripped brain and its mask reaches the image's edge; two heads side by side get a mask
    half outside them. Both are warned about (a user then checks the mask or gives one)."""
    import logging

    assert not any("automatic brain mask" in w for w in template_head[2])  # the whole head (as float32)
    head = sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1))
    size = head.GetSize()
    hemisphere = head[: size[0] // 2, :, :]
    with caplog.at_level(logging.WARNING):
        compute_brain_mask(hemisphere)
    assert "The automatic brain mask reaches the edge of the image" in caplog.text
    caplog.clear()
    arr = sitk.GetArrayFromImage(head)
    two = sitk.GetImageFromArray(np.concatenate([arr, arr], axis=2))
    two.SetSpacing(head.GetSpacing())
    with caplog.at_level(logging.WARNING):
        compute_brain_mask(two)
    assert "The automatic brain mask fits the image poorly" in caplog.text


def test_cut_off_head_whose_air_is_zero_is_registered_and_a_cut_stripped_brain_is_not(caplog):
    """The bundled colin27 head (with skull, air exactly 0) with the lower half of its brain cut off is brain-sized
    with a constant background, like a skull-stripped brain; the dark skull under its scalp tells it apart, so the
    template is registered (taking it for a stripped brain made head and skull the mask). The same cut of the
    stripped brain (head x brain mask) is still its own mask, without a registration."""
    import logging

    from CeVAEAnomalyResearch.acquisition import Recipe, derive

    head = sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1))
    brain = sitk.ReadImage(str(default_template_dir() / TEMPLATE_MASK))
    nothing = sitk.Image(brain.GetSize(), sitk.sitkUInt8)
    nothing.CopyInformation(brain)
    cut = Recipe(crop=("bottom", 0.5))
    image, reference, _ = derive(cut, head, brain, nothing, 0)
    with caplog.at_level(logging.INFO):
        mask = compute_brain_mask(image)
    assert "looks skull-stripped" not in caplog.text
    assert_same_grid(mask, image)
    assert dice(mask, reference) >= 0.9

    stripped = sitk.Mask(sitk.Cast(head, sitk.sitkFloat32), sitk.Cast(brain > 0, sitk.sitkUInt8))
    image, reference, _ = derive(cut, stripped, brain, nothing, 0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        mask = compute_brain_mask(image)
    assert "looks skull-stripped" in caplog.text
    assert dice(mask, reference) >= 0.95



def test_a_whole_stripped_brain_of_reversed_contrast_is_its_own_mask(robex, caplog):
    """robex skull-stripped with its contrast reversed (T2-like: bright CSF at the surface, darker inside) has a
    dark band under its surface, like a head; but it reaches no edge of the image, so it is no cut-off head and
    stays its own mask (the skull test on its own registered it: Dice 0.82)."""
    import logging

    head, brain = robex
    values, inside = sitk.GetArrayFromImage(head).astype(np.float32), sitk.GetArrayFromImage(brain) > 0
    low, high = np.percentile(values[inside], [1, 99])
    reversed_contrast = sitk.GetImageFromArray(np.where(inside, np.clip(high + low - values, 1.0, None), 0.0)
                                               .astype(np.float32))
    reversed_contrast.CopyInformation(head)
    with caplog.at_level(logging.INFO):
        mask = compute_brain_mask(reversed_contrast)
    assert "looks skull-stripped" in caplog.text and dice(mask, brain) >= 0.99


def test_a_fine_scan_is_averaged_in_blocks_before_its_registration_copy_is_smoothed():
    """Below 1 mm the 4 mm copy comes from ~1 mm block averages: the same grid and values within 3 % of the range
    of smoothing every voxel, which costs eight times the voxels at 0.5 mm."""
    from conftest import make_head
    from CeVAEAnomalyLib.engine.brainmask import _downsampled

    image, _ = make_head(size=(110, 120, 100), spacing=(0.45, 0.5, 0.48), direction=oblique_direction())
    target = 4.0

    def every_voxel_smoothed(im: sitk.Image, grid: sitk.Image) -> np.ndarray:
        sigmas = 0.5 * np.sqrt(target**2 - np.array(im.GetSpacing()) ** 2)
        smoothed = sitk.SmoothingRecursiveGaussian(im, sigmas.tolist())
        return sitk.GetArrayFromImage(sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear,
                                                    float(sitk.GetArrayViewFromImage(im).min()), sitk.sitkFloat32))

    fast = _downsampled(image)
    size = np.array(image.GetSize())
    assert fast.GetSpacing() == (target,) * 3 and fast.GetDirection() == image.GetDirection()
    assert np.allclose(fast.TransformContinuousIndexToPhysicalPoint(((np.array(fast.GetSize()) - 1) / 2).tolist()),
                       image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    a, b = every_voxel_smoothed(image, fast), sitk.GetArrayFromImage(fast)
    assert np.abs(a - b).max() <= 0.03 * (a.max() - a.min())
    coarse = sitk.Resample(image, [int(n / 2) for n in size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                           (1.0, 1.0, 1.0), image.GetDirection(), 0.0, image.GetPixelID())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_downsampled(coarse)),  # 1 mm voxels: smoothed as they are
                                  every_voxel_smoothed(coarse, _downsampled(coarse)))



def test_a_thin_stack_of_fine_slices_keeps_enough_voxels_to_smooth():
    """Block averaging never leaves an axis with fewer voxels than the volume checks allow (4)."""
    from CeVAEAnomalyLib.engine.brainmask import _downsampled

    for slices, spacing in ((6, 0.5), (5, 0.3), (11, 0.3)):
        image = sitk.GetImageFromArray(np.random.default_rng(0).random((slices, 60, 60), dtype=np.float32))
        image.SetSpacing((1.0, 1.0, spacing))
        assert _downsampled(image).GetSize()[:2] == (15, 15)


def test_registrations_in_two_threads_leave_itk_s_thread_count_as_it_was():
    """ITK runs on one thread while any registration runs; overlapping ones (two threads) restore the caller's
    count once the last has ended, not the 1 the first had set."""
    import threading

    from CeVAEAnomalyLib.engine.brainmask import _single_threaded_itk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
    try:
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = []

        def first() -> None:
            with _single_threaded_itk():
                first_in.set()
                second_in.wait(10)
            first_out.set()

        def second() -> None:
            first_in.wait(10)
            with _single_threaded_itk():
                second_in.set()
                first_out.wait(10)
                seen.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())  # the other one has ended

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == [1] and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@pytest.mark.parametrize("spike", [1e20, -1e20])
def test_one_corrupt_voxel_far_outside_the_head_s_range_leaves_the_mask_alone(template_head, spike):
    """One brain voxel of 1e20 (a corrupt float voxel) was smoothed into a bright blob on the registration copy and
    took the mask (Dice 0.38 with the head's own, the brain scored a quarter of its size); a voxel that far above or
    below the head's tissue range is a spike, not anatomy, and the mask is the head's (its other voxels unchanged)."""
    head, mask, _ = template_head
    spiked = sitk.Cast(head, sitk.sitkFloat64)
    centre = [int(k) for k in np.argwhere(sitk.GetArrayViewFromImage(mask) > 0).mean(axis=0)][::-1]
    spiked[centre] = spike
    assert dice(compute_brain_mask(spiked), mask) > 0.99
    assert sitk.GetArrayViewFromImage(head).max() < 1e6  # (the head itself untouched: the copy was spiked)
