"""Chapter 10's pieces: the neuron-volume generator and readers (effnb.data) and the filter and metrics (effnb.tracing)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import effnb.data as D
import effnb.tracing as T


@pytest.fixture(scope="module")
def volume() -> D.NeuronVolume:
    return D.make_neuron_volume(seed=3)


# --- the generator -------------------------------------------------------------------------------

def test_volume_is_deterministic_bounded_and_has_one_tree_and_start_per_neuron(volume):
    again = D.make_neuron_volume(seed=3)
    assert np.array_equal(volume.image, again.image) and not np.array_equal(volume.image, D.make_neuron_volume(seed=4).image)
    assert volume.image.shape == (48, 96, 96, 3) and volume.image.dtype == np.float32
    assert 0 <= volume.image.min() and volume.image.max() <= 1
    assert len(volume.neurons) == len(volume.starts) == len(volume.colours) == 6
    for table, start in zip(volume.neurons, volume.starts):
        ids, parents = table[:, 0].astype(int), table[:, 6].astype(int)
        assert np.array_equal(ids, np.arange(1, len(table) + 1)) and (parents == -1).sum() == 1
        assert np.all((parents < ids)), "parents come before their children"
        points = T.swc_points(table)
        steps = np.linalg.norm(np.diff(points[: len(T.segments(table)[0])], axis=0), axis=1)
        assert np.allclose(steps, 1.0, atol=1e-6), "main-curve nodes are one voxel apart"
        assert np.all(points >= 0) and np.all(points <= np.array(volume.shape) - 1)
        assert start.plane in D.PLANES and start.direction in (-1, 1) and start.size % 2 == 1
        assert np.allclose(start.centre, points[0]), "the start box sits at the root"


def test_neurons_are_bright_on_their_centre_line_in_their_own_colour(volume):
    background = np.median(volume.image)
    for table, colour in zip(volume.neurons, volume.colours):
        z, y, x = np.round(T.swc_points(table)[:10]).astype(int).T
        seen = volume.image[z, y, x].mean(0)
        assert seen.max() > background + 0.4, "a neuron stands out of the background"
        cosine = seen @ colour / np.linalg.norm(seen) / np.linalg.norm(colour)
        assert cosine > 0.9, f"near its root a neuron has its colour ({seen} vs {colour})"


def test_the_generator_makes_crossings_branches_and_turns_when_asked():
    crossing = D.make_neuron_volume(seed=0, n_neurons=4, cross_fraction=1.0, branch_fraction=1.0)
    first = T.swc_points(crossing.neurons[0])
    closest = [np.linalg.norm(T.swc_points(t)[:, None] - first[None], axis=-1).min() for t in crossing.neurons[1:]]
    assert min(closest) < 1.5, "with cross_fraction=1 a later neuron passes through an earlier one"
    assert any(len(T.segments(t)) > 1 for t in crossing.neurons), "with branch_fraction=1 some neuron branches"
    none = D.make_neuron_volume(seed=0, n_neurons=4, cross_fraction=0.0, branch_fraction=0.0)
    assert all(len(T.segments(t)) == 1 for t in none.neurons)


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": (8, 96, 96)}, "shape=.*>= 16"),
    ({"n_neurons": 0}, "n_neurons=0 must be a whole number"),
    ({"branch_fraction": 1.5}, r"branch_fraction=1.5 must lie in \[0, 1\]"),
])
def test_bad_generator_parameters_get_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D.make_neuron_volume(**kwargs)


def test_swc_round_trip_and_errors(tmp_path, volume):
    path = tmp_path / "neuron.swc"
    D.write_swc(path, volume.neurons[0])
    back = D.read_swc(path)
    assert back.shape == volume.neurons[0].shape and np.allclose(back, volume.neurons[0], atol=5e-4)
    (tmp_path / "bad.swc").write_text("# header\n1 3 0 0 0 1\n")
    with pytest.raises(ValueError, match="line 2: an SWC row has 7 numbers"):
        D.read_swc(tmp_path / "bad.swc")
    with pytest.raises(FileNotFoundError, match="no SWC file"):
        D.read_swc(tmp_path / "missing.swc")
    with pytest.raises(ValueError, match="7 columns"):
        D.write_swc(path, np.zeros((3, 5)))


def test_tiff_stack_reader_handles_channel_orders_and_integer_types(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    stack = (np.random.default_rng(0).random((5, 3, 12, 10)) * 65535).astype(np.uint16)   # ImageJ's ZCYX
    tifffile.imwrite(tmp_path / "zcyx.tif", stack)
    read = D.read_tiff_stack(tmp_path / "zcyx.tif")
    assert read.shape == (5, 12, 10, 3) and read.dtype == np.float32
    assert np.allclose(read, np.moveaxis(stack, 1, -1) / 65535)
    tifffile.imwrite(tmp_path / "grey.tif", stack[:, 0])
    assert D.read_tiff_stack(tmp_path / "grey.tif").shape == (5, 12, 10, 1)
    with pytest.raises(FileNotFoundError, match="no TIFF stack"):
        D.read_tiff_stack(tmp_path / "missing.tif")


# --- the filter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [(0, 0), (3, -2), (-5, 4)])
def test_dcf_finds_a_shifted_template_exactly(shift):
    pattern = np.random.default_rng(1).normal(size=(3, 32, 32))
    dcf = T.DCF((32, 32), window=False).update(pattern)
    found = dcf.detect(np.roll(pattern, shift, axis=(1, 2)))
    assert found.shift == (float(shift[0]), float(shift[1]))
    assert found.peak == pytest.approx(1.0, abs=1e-3) and found.second_ratio < 0.2


def test_a_crowded_volume_still_finds_each_neuron_a_colour():
    """Seed 10 with 10 neurons has no tenth colour 0.5 from the other nine (the generator used to loop forever)."""
    v = D.make_neuron_volume((48, 96, 96), 10, 10)
    gaps = np.linalg.norm(v.colours[:, None] - v.colours[None], axis=-1) + 9 * np.eye(10)
    assert len(v.neurons) == 10 and gaps.min() > 0.3


def test_hann_window_is_matlabs_symmetric_hann_as_the_papers_tracer_uses():
    """MATLAB's hann(N) = 0.5 (1 - cos(2 pi n / (N - 1))), n = 0..N-1: zero at both ends, peak 1 at the centre."""
    for n in (5, 24):
        matlab = 0.5 * (1 - np.cos(2 * np.pi * np.arange(n) / (n - 1)))
        assert np.allclose(T.hann_window((n, n)), np.outer(matlab, matlab), atol=1e-15)
    w = T.hann_window((24, 25))
    assert w.shape == (24, 25) and w[0].max() == 0 == w[:, -1].max() and w.max() <= 1


def test_dcf_response_equals_the_closed_form_on_one_channel():
    """One channel, no window: response = ifft( conj(conj(G) F) Z / (|F|^2 + lam) ), written out in NumPy."""
    rng = np.random.default_rng(2)
    f, z = rng.normal(size=(16, 16)), rng.normal(size=(16, 16))
    dcf = T.DCF((16, 16), sigma=1.5, lam=0.1, window=False).update(f)
    G, F, Z = np.fft.fft2(T.gaussian_label((16, 16), 1.5)), np.fft.fft2(f), np.fft.fft2(z)
    expected = np.fft.ifft2(G * np.conj(F) * Z / (np.abs(F) ** 2 + 0.1)).real
    assert np.allclose(dcf.response(z), expected)


def test_dcf_update_blends_and_errors_name_the_fix():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    blended = T.DCF((8, 8)).update(a).update(b, rate=0.25)
    fresh_a, fresh_b = T.DCF((8, 8)).update(a), T.DCF((8, 8)).update(b)
    assert np.allclose(blended.A, 0.75 * fresh_a.A + 0.25 * fresh_b.A)
    with pytest.raises(RuntimeError, match="call update"):
        T.DCF((8, 8)).response(a)
    with pytest.raises(ValueError, match="given to a filter of shape"):
        fresh_a.response(np.zeros((9, 8)))
    with pytest.raises(ValueError, match="at least 4 x 4"):
        T.DCF((2, 8))


# --- the metrics ---------------------------------------------------------------------------------

def test_ground_truth_scores_perfectly_against_itself(volume):
    for table in volume.neurons:
        points = T.swc_points(table)
        assert T.vsa_score(points, points) == 1.0
        assert T.mean_distance(points, points) == 0.0
        assert T.branch_recovery(points, table) == 1.0


def test_metrics_fall_as_a_trace_goes_wrong():
    line = np.stack([np.arange(40.0), np.zeros(40), np.zeros(40)], 1)
    assert T.vsa_score(line[:20], line) == pytest.approx(2 * 20 / 60)              # half the neuron traced
    assert T.vsa_score(line + [0, 2.5, 0], line, radii=(1.0, 2.0)) == 0.0          # 2.5 voxels off
    assert T.vsa_score(line + [0, 2.5, 0], line, radii=(3.0,)) == 1.0
    assert T.mean_distance(line + [0, 0, 3], line) == pytest.approx(3.0)
    assert T.mean_distance(np.zeros((0, 3)), line) == float("inf") and T.vsa_score(np.zeros((0, 3)), line) == 0.0


def test_segments_and_branch_recovery_on_a_y():
    # root 1 -> 2 -> 3 (branch point) -> 4 -> 5, and 3 -> 6 -> 7: three segments, two of them branches
    rows = [[1, -1, 0], [2, 1, 1], [3, 2, 2], [4, 3, 3], [5, 4, 4], [6, 3, 10], [7, 6, 11]]
    table = np.array([[i, 3, x, 0, 0, 1, p] for i, p, x in rows], float)
    parts = T.segments(table)
    assert sorted(map(list, parts)) == [[0, 1, 2], [2, 3, 4], [2, 5, 6]]
    main_only = T.swc_points(table)[:5]
    assert T.branch_recovery(main_only, table, radius=0.5) == 0.5
    assert T.branch_recovery(T.swc_points(table), table, radius=0.5) == 1.0
    with pytest.raises(ValueError, match="radius=0"):
        T.branch_recovery(main_only, table, radius=0)


def test_plane_slice_and_crop(volume):
    image = volume.image
    sl, axes = T.plane_slice(image, 2, 40)
    assert axes == [0, 1] and np.array_equal(sl, image[:, :, 40])
    patch = T.crop(sl, (0.2, 10.0), 7)                                     # half outside the top edge
    assert patch.shape == (7, 7, 3) and np.all(patch[:3] == 0) and np.array_equal(patch[3:], sl[0:4, 7:14])


def test_start_box_follows_the_first_direction():
    line = np.array([[i + 1, 3, 5.0, 5.0 + 0.3 * i, 2.0 + i, 2.0, i if i else -1] for i in range(10)])   # mostly +z
    box = D.start_box(line)
    assert box.plane == "xy" and box.direction == 1 and box.centre == (2.0, 5.0, 5.0) and box.size == 11


def test_resample_polyline_spaces_points_one_voxel_apart_along_the_line():
    steps = np.stack([np.arange(5.0), np.arange(5.0), np.zeros(5)], 1)               # 45 degrees: sqrt(2) apart
    even = T.resample_polyline(steps)
    gaps = np.linalg.norm(np.diff(even, axis=0), axis=1)
    assert np.allclose(gaps[:-1], 1.0) and gaps[-1] <= 1.0 + 1e-9
    assert np.allclose(even[0], steps[0]) and np.allclose(even[-1], steps[-1]) and len(even) == 7
    assert T.resample_polyline(steps[:1]).shape == (1, 3)


# --- the chapter with a real stack (the VOLUME_TIFF / SWC_FILES route), on fabricated files ---------

CHAPTER = Path(__file__).resolve().parents[1] / "notebooks" / "10_neuron_tracing.ipynb"


def test_chapter_traces_a_tiff_stack_from_its_swc_files(tmp_path, monkeypatch):
    """Chapter 10 with VOLUME_TIFF and SWC_FILES, on a small generated volume written as an ImageJ ZCYX stack (~40 s)."""
    tifffile = pytest.importorskip("tifffile")
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("EFFNB_BLOCK_NETWORK", "1")
    volume = D.make_neuron_volume((32, 64, 64), 2, seed=5)
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis((volume.image * 65535).astype(np.uint16), -1, 1))
    swc = [str(tmp_path / f"n{k}.swc") for k in range(2)]
    for path, table in zip(swc, volume.neurons):
        D.write_swc(path, table)
    out = papermill.execute_notebook(str(CHAPTER), str(tmp_path / "out.ipynb"), cwd=str(CHAPTER.parent), progress_bar=False,
                                     parameters={"VOLUME_TIFF": str(tmp_path / "stack.tif"), "SWC_FILES": swc})
    printed = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "volume 0: (32, 64, 64, 3), neurons of" in printed, "the stack was read in (Z, Y, X, C) order"
    claims = [line for line in printed.splitlines() if re.match(r"\[(reproduced|not reproduced|inconclusive)\] the full "
                                                                 r"tracer .*, 95% CI \[", line) and "[neurons = " not in line]
    assert len(claims) == 4, "the experiment and the claim check ran on it, each claim (VSA, BRR) judged with its interval"
    assert "differs from the stored points" in printed, "section 6.1 reads the stored sweep as orientation only"


@pytest.mark.parametrize("parameters, message", [
    ({"VOLUME_TIFF": "stack.tif"}, "VOLUME_TIFF and SWC_FILES go together"),
    ({"VOLUME_TIFF": "stack.tif", "SWC_FILES": "n0.swc"}, "must be a list of .swc paths"),
])
def test_chapter_refuses_half_a_real_stack(tmp_path, parameters, message):
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError, match=message):
        papermill.execute_notebook(str(CHAPTER), str(tmp_path / "out.ipynb"), cwd=str(CHAPTER.parent),
                                   progress_bar=False, parameters=parameters)
