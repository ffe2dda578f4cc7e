"""rank-report: ranks, subspace agreement and captured variance against hand-computed numbers,
and the command end to end on small hand-built calibration files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lokitool import report
from lokitool.calibration import Calibration
from lokitool.errors import UserError
from lokitool.models import ModelFacts
from lokitool.pca import PCA, eig_descending

HALVING = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)  # sum 15.9375
# cumulative ratio: .502 .753 .878 .941 .973 .988 .996 1 -> rank 3 at 0.8, 4 at 0.9, 5 at 0.95
FLAT = torch.ones(8, dtype=torch.float64)  # rank ceil(8 v): 7 at 0.8, 8 at 0.9 and 0.95


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # rows (and columns) orthonormal


def facts(num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8, model_id: str = "toy/model") -> ModelFacts:
    return ModelFacts(
        model_id=model_id, revision=None, architecture="llama", num_layers=num_layers, num_heads=2 * num_kv_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, rope=True, max_positions=256, bos_token_id=1,
    )


def calibration(eigenvalues: torch.Tensor, components: torch.Tensor, dataset: str = "toy:a", **fact_args) -> Calibration:
    """eigenvalues [L, H, D], components [L, H, D, D] (rows); the same PCA before and after RoPE."""
    num_layers, num_heads, dim = eigenvalues.shape

    def pca() -> PCA:  # a copy per kind: safetensors refuses to save tensors that share memory
        mean = torch.zeros(num_layers, num_heads, dim)
        return PCA(mean=mean, components=components.float().clone(), eigenvalues=eigenvalues.float().clone())

    return Calibration(
        facts=facts(num_layers, num_heads, dim, **fact_args),
        info={"dataset": dataset, "num_tokens": 4096, "seq_len": 512},
        pca={"pre": pca(), "post": pca()},
    )


def rotated_pair(seed: int = 0) -> tuple[Calibration, Calibration, torch.Tensor]:
    """A: halving spectrum (head 0) and flat spectrum (head 1) in random orthonormal bases, 2 layers.
    B: the same, but B's 4th and 5th directions are A's 5th and 4th, so B's top 4 shares 3 of A's top 4."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.stack([random_orthogonal(8, g) for _ in range(2)]) for _ in range(2)])  # [2, 2, 8, 8]
    eigenvalues = torch.stack([HALVING, FLAT]).expand(2, 2, 8).clone()
    swapped = rows[:, :, [0, 1, 2, 4, 3, 5, 6, 7]]
    a = calibration(eigenvalues, rows, dataset="toy:older")
    b = calibration(eigenvalues, swapped, dataset="toy:newer")
    return a, b, rows


# ----------------------------------------------------------------------------------------------
# thresholds


def test_parse_variance_sorts_and_dedupes():
    assert report.parse_variance("0.95, 0.8,0.9,0.9") == (0.8, 0.9, 0.95)
    assert report.parse_variance("1") == (1.0,)


@pytest.mark.parametrize("text, words", [
    ("0.8,abc", "'abc' is not a number"),
    ("0", "outside (0, 1]"),
    ("90", "not percentages"),
    ("1.01", "outside (0, 1]"),
    ("-0.5", "outside (0, 1]"),
    ("nan", "outside (0, 1]"),
    (" , ", "no variance threshold"),
])
def test_parse_variance_refuses(text, words):
    with pytest.raises(UserError) as err:
        report.parse_variance(text)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_reference_threshold_prefers_0_9_else_middle():
    assert report.reference_threshold((0.8, 0.9, 0.95)) == 0.9
    assert report.reference_threshold((0.5, 0.7, 0.99)) == 0.7
    assert report.reference_threshold((0.6,)) == 0.6


# ----------------------------------------------------------------------------------------------
# ranks


def test_ranks_of_known_spectra():
    a, _, _ = rotated_pair()
    ranks = report.ranks_at(a.pca["pre"], (0.8, 0.9, 0.95, 1.0))
    assert ranks[0.8].tolist() == [[3, 7], [3, 7]]
    assert ranks[0.9].tolist() == [[4, 8], [4, 8]]
    assert ranks[0.95].tolist() == [[5, 8], [5, 8]]
    assert ranks[1.0].tolist() == [[8, 8], [8, 8]]


def test_rank_counts_reaching_the_threshold_exactly():
    # [1, 1, 0, 0]: the top direction holds exactly half, both hold all of it
    pca = PCA(mean=torch.zeros(1, 1, 4), components=torch.eye(4)[None, None], eigenvalues=torch.tensor([[[1.0, 1, 0, 0]]]))
    ranks = report.ranks_at(pca, (0.5, 0.51, 1.0))
    assert (ranks[0.5].item(), ranks[0.51].item(), ranks[1.0].item()) == (1, 2, 2)


# ----------------------------------------------------------------------------------------------
# subspace agreement


def test_agreement_identical_orthogonal_and_half():
    eye = torch.eye(4, dtype=torch.float64)
    two = torch.tensor(2)
    assert report.subspace_agreement(eye, eye, two).item() == pytest.approx(1.0)
    orthogonal = eye[[2, 3, 0, 1]]  # top 2 = e3, e4
    assert report.subspace_agreement(eye, orthogonal, two).item() == pytest.approx(0.0, abs=1e-12)
    shares_one = eye[[0, 2, 1, 3]]  # top 2 = e1, e3: shares e1 with e1, e2
    assert report.subspace_agreement(eye, shares_one, two).item() == pytest.approx(0.5)
    # rotated by the same orthogonal matrix, nothing changes
    q = random_orthogonal(4, torch.Generator().manual_seed(1))
    assert report.subspace_agreement(eye @ q, shares_one @ q, two).item() == pytest.approx(0.5)


def test_agreement_is_mean_squared_cosine_of_principal_angles():
    from scipy.linalg import subspace_angles

    g = torch.Generator().manual_seed(2)
    a = torch.stack([random_orthogonal(10, g) for _ in range(4)])  # [4, 10, 10]
    b = torch.stack([random_orthogonal(10, g) for _ in range(4)])
    d = torch.tensor([1, 3, 5, 10])
    got = report.subspace_agreement(a, b, d)
    for i, k in enumerate(d.tolist()):
        angles = subspace_angles(a[i, :k].T.numpy(), b[i, :k].T.numpy())
        assert got[i].item() == pytest.approx(float((torch.cos(torch.from_numpy(angles)) ** 2).mean()), abs=1e-10)
    assert got[3].item() == pytest.approx(1.0)  # d = D: both span everything


# ----------------------------------------------------------------------------------------------
# captured variance


def test_captured_variance_by_hand():
    cov = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64))
    eye = torch.eye(4, dtype=torch.float64)
    assert report.captured_variance(eye[[0, 2, 1, 3]], torch.tensor(2), cov).item() == pytest.approx(0.6)  # (4+2)/10
    diagonal = eye.clone()
    diagonal[0] = torch.tensor([1.0, 1, 0, 0]) / math.sqrt(2)
    assert report.captured_variance(diagonal, torch.tensor(1), cov).item() == pytest.approx(0.35)  # (4+3)/2/10


def test_captured_variance_matches_projected_samples():
    g = torch.Generator().manual_seed(3)
    dim, d = 6, 3
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1], dtype=torch.float64)
    samples = torch.randn(20000, dim, generator=g, dtype=torch.float64) @ mix.T + 4.0
    centred = samples - samples.mean(0)
    eigenvalues, rows = eig_descending(centred.T @ centred / len(samples))
    b = PCA(mean=samples.mean(0)[None, None], components=rows[None, None], eigenvalues=eigenvalues[None, None])
    basis_a = random_orthogonal(dim, g)
    direct = (centred @ basis_a[:d].T).square().sum() / centred.square().sum()
    got = report.captured_variance(basis_a[None, None], torch.tensor([[d]]), b.covariance())
    assert got.item() == pytest.approx(direct.item(), rel=1e-9)
    # B's own basis captures its top-d eigenvalue share, and more than any other basis
    own = report.own_variance(eigenvalues, torch.tensor(d))
    assert own.item() == pytest.approx((eigenvalues[:d].sum() / eigenvalues.sum()).item())
    assert own.item() > got.item()


# ----------------------------------------------------------------------------------------------
# comparisons


def test_self_comparison_agrees_fully():
    a, _, _ = rotated_pair()
    for kind, c in report.compare(a, a, 0.9).items():
        assert c.d.tolist() == [[4, 8], [4, 8]]
        assert torch.allclose(c.agreement, torch.ones(2, 2, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(c.captured, c.own, atol=1e-6)
        assert c.own[:, 0].tolist() == pytest.approx([15 / 15.9375] * 2)


def test_comparison_of_partly_shared_subspaces():
    a, b, _ = rotated_pair()
    built = report.build_report([("a.safetensors", a), ("b.safetensors", b)], (0.8, 0.9, 0.95))
    assert [(p.a, p.b) for p in built.comparisons] == [(0, 1), (1, 0)]
    for pair in built.comparisons:
        c = pair.kinds["post"]
        # halving head: top 4 share 3 directions; B's variance in A's span: 8+4+2+0.5 of 15.9375
        assert c.agreement[:, 0].tolist() == pytest.approx([0.75, 0.75], abs=1e-6)
        assert c.captured[:, 0].tolist() == pytest.approx([14.5 / 15.9375] * 2, abs=1e-6)
        assert c.own[:, 0].tolist() == pytest.approx([15 / 15.9375] * 2, abs=1e-6)
        # flat head: d = 8 = D, everything agrees
        assert c.agreement[:, 1].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_refuses_different_models():
    a, _, rows = rotated_pair()
    other = calibration(a.pca["pre"].eigenvalues, rows, model_id="toy/other")
    with pytest.raises(UserError, match="toy/other.*toy/model.*one model"):
        report.build_report([("a", a), ("b", other)], (0.9,))
    narrow = calibration(torch.ones(2, 2, 4), torch.eye(4).expand(2, 2, 4, 4))
    with pytest.raises(UserError, match="head dim 4.*head dim 8"):
        report.build_report([("a", a), ("b", narrow)], (0.9,))


def test_dumps_keeps_number_lists_on_one_line():
    obj = {"a": [1, 2, 3], "b": [{"c": [0.5, None]}], "s": ["x, y", "z"]}
    text = report.dumps(obj)
    assert json.loads(text) == obj
    assert '"a": [1, 2, 3]' in text and '"c": [0.5, null]' in text


# ----------------------------------------------------------------------------------------------
# the command


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from lokitool.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.fixture()
def two_files(tmp_path):
    a, b, _ = rotated_pair()
    paths = [tmp_path / "older.safetensors", tmp_path / "newer.safetensors"]
    a.save(paths[0])
    b.save(paths[1])
    return [str(p) for p in paths]


def test_cli_writes_report_with_the_right_numbers(tmp_path, two_files, capsys):
    out_dir = tmp_path / "reports" / "rank"
    code, out, err = run_cli(["rank-report", *two_files, "--output-dir", str(out_dir)], capsys)
    assert code == 0, err

    data = json.loads((out_dir / "report.json").read_text())
    assert data["files"] == two_files and data["variance"] == [0.8, 0.9, 0.95]
    first = data["calibrations"][0]
    assert first["model"] == "toy/model" and first["dataset"] == "toy:older"
    assert first["model_facts"]["head_dim"] == 8 and first["info"]["num_tokens"] == 4096
    assert first["layers"][1] == {
        "layer": 1,
        "pre": {"0.8": [3, 7], "0.9": [4, 8], "0.95": [5, 8]},
        "post": {"0.8": [3, 7], "0.9": [4, 8], "0.95": [5, 8]},
    }
    assert first["mean_rank"]["post"]["0.9"] == 6.0

    assert [(c["a"], c["b"]) for c in data["comparisons"]] == [tuple(two_files), tuple(reversed(two_files))]
    layer = data["comparisons"][0]["layers"][1]
    assert (layer["layer"], layer["kind"], layer["d"]) == (0, "post", [4, 8])
    assert layer["agreement"] == pytest.approx([0.75, 1.0], abs=1e-5)
    assert layer["captured_variance"] == pytest.approx([14.5 / 15.9375, 1.0], abs=1e-5)

    md = (out_dir / "report.md").read_text()
    # layer 0 of older: means of heads (3, 7), (4, 8), (5, 8) pre and post, then the heads at 90%
    assert "| 0 | 5.0 | 6.0 | 6.5 | 5.0 | 6.0 | 6.5 | 4 / 8 | 4 / 8 |" in md
    assert "| older | newer | post-RoPE | 6.0 | 0.875 (min 0.750) |" in md
    for name in ("rank_per_layer.png", "comparison.png", "1-older-heatmap.png", "2-newer-spectrum.png"):
        assert f"]({name})" in md
        png = (out_dir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "rank at 90% per layer" in out and "0.875" in out


def test_cli_single_file_has_no_comparisons(tmp_path, two_files, capsys):
    code, _, err = run_cli(["rank-report", two_files[0], "--output-dir", str(tmp_path / "one"), "--variance", "0.5"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "one" / "report.json").read_text())
    # rank at 0.5: 1 for the halving spectrum (8 of 15.94), 4 for the flat one
    assert data["comparisons"] == [] and data["calibrations"][0]["mean_rank"]["pre"] == {"0.5": 2.5}
    assert not (tmp_path / "one" / "comparison.png").exists()


@pytest.mark.parametrize("case", ["missing", "foreign", "variance", "unwritable", "other-model", "twice"])
def test_cli_bad_input_is_one_line(tmp_path, two_files, capsys, case):
    target = tmp_path / "out"
    args = [*two_files, "--output-dir", str(target)]
    expected = {
        "missing": "does not exist",
        "foreign": "not a calibration file",
        "variance": "outside (0, 1]",
        "unwritable": "cannot create directory",
        "other-model": "one model",
        "twice": "given twice",
    }[case]
    if case == "missing":
        args[1] = str(tmp_path / "nope.safetensors")
    elif case == "foreign":
        (tmp_path / "notes.safetensors").write_text("hello")
        args[1] = str(tmp_path / "notes.safetensors")
    elif case == "variance":
        args += ["--variance", "0.9,95"]
    elif case == "unwritable":
        (tmp_path / "plain-file").write_text("")
        target = tmp_path / "plain-file" / "report"
        args[-1] = str(target)
    elif case == "other-model":
        a, _, rows = rotated_pair()
        calibration(a.pca["pre"].eigenvalues, rows, model_id="toy/other").save(tmp_path / "other.safetensors")
        args[1] = str(tmp_path / "other.safetensors")
    elif case == "twice":
        args[1] = args[0]
    code, _, err = run_cli(["rank-report", *args], capsys)
    assert code == 2
    assert err.startswith("error:") and expected in err and err.count("\n") == 1
    assert not (target / "report.json").exists()
