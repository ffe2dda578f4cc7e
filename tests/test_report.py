"""rank-report: ranks, subspace agreement, captured variance and score variance captured per basis
against hand-computed numbers, and the command end to end on small hand-built calibration files."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lokitool.calib.calibration import Calibration
from lokitool.calib.models import ModelFacts
from lokitool.calib.pca import PCA, eig_descending
from lokitool.errors import UserError
from lokitool.report import core as report

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


def with_queries(query_eigenvalues: torch.Tensor, seed: int = 4, dataset: str = "toy:queries") -> tuple[Calibration, torch.Tensor]:
    """Keys with the halving spectrum and queries with E[q q^T] = R^T diag(query_eigenvalues) R, where R
    (rows) is the keys' own principal basis, random per (layer, head): 2 layers, 2 KV heads, D = 8."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.stack([random_orthogonal(8, g) for _ in range(2)]) for _ in range(2)])  # [2, 2, 8, 8]
    keys = calibration(HALVING.expand(2, 2, 8).clone(), rows, dataset=dataset)
    moment = rows.transpose(-1, -2) @ (query_eigenvalues.to(torch.float64).unsqueeze(-1) * rows)  # [2, 2, 8, 8]
    cal = Calibration(facts=keys.facts, info=keys.info, pca=keys.pca,
                      query_moment={"pre": moment.float().clone(), "post": moment.float().clone()})
    return cal, rows


# Queries blind to the keys' top 4 directions: S = diag(0, 0, 0, 0, 1, 1, 1, 1) in the keys' basis, so
# c_i s_i = (0, 0, 0, 0, .5, .25, .125, .0625), tr(CS) = .9375. Both diagonal: the best d directions
# are those with the largest c_i s_i, and the error is the sum of the c_i s_i left out.
BLIND = torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1])


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


def test_parse_dims_and_rounding():
    assert report.parse_dims("0.5, 0.25,0.5") == (0.25, 0.5)
    assert report.dims_for((0.25, 0.5), 64) == (16, 32)
    assert report.dims_for((0.25, 0.3, 1.0), 8) == (2, 8)  # 2.4 rounds to 2: one d
    assert report.dims_for((0.3125, 0.01), 8) == (1, 3)  # 2.5 rounds up; never below 1
    for text, words in (("16", "outside (0, 1]"), ("a", "'a' is not a number; give fractions such as --dims"), ("", "no dimension fraction")):
        with pytest.raises(UserError, match=re.escape(words)):
            report.parse_dims(text)


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


# ----------------------------------------------------------------------------------------------
# score variance captured


def by_d(svs, kind="post") -> dict:
    return {sv.d: sv for sv in svs if sv.kind == kind}


def test_score_variance_when_queries_ignore_the_top_key_directions():
    cal, rows = with_queries(BLIND)
    calls = []
    svs = by_d(report.score_variances(cal, (2, 4, 6), progress=calls.append, name="toy"))
    assert len(calls) == 6 and calls[3] == "query-aware basis 4/6: toy post-RoPE, d = 2"
    total = 0.9375
    expected = {  # d: (key variance, PCA, query-aware)
        2: (12 / 15.9375, 0.0, 0.75 / total),  # PCA keeps e1, e2 (s = 0); the best two are e5, e6
        4: (15 / 15.9375, 0.0, 1.0),  # PCA keeps exactly what queries ignore; e5..e8 keep everything
        6: (15.75 / 15.9375, 0.75 / total, 1.0),  # PCA now keeps e5, e6 but drops e7, e8
    }
    for d, (key, pca, qa) in expected.items():
        sv = svs[d]
        assert sv.key_variance.flatten().tolist() == pytest.approx([key] * 4, abs=1e-6)
        assert sv.captured["pca"].flatten().tolist() == pytest.approx([pca] * 4, abs=1e-6)
        assert sv.captured["query_aware"].flatten().tolist() == pytest.approx([qa] * 4, abs=1e-6)
        # random: straight from the definition, with the projector formed explicitly
        u = report.random_basis(2, 2, 8)[..., :d]
        rest = torch.eye(8, dtype=torch.float64) - u @ u.transpose(-1, -2)
        c = cal.pca["post"].covariance()
        s = cal.query_moment["post"].double()
        direct = 1 - (rest @ c @ rest @ s).diagonal(dim1=-2, dim2=-1).sum(-1) / total
        assert torch.allclose(sv.captured["random"], direct, atol=1e-6)
        assert (sv.captured["random"] <= sv.captured["query_aware"] + 1e-9).all()  # nothing beats the optimum


def test_score_variance_with_isotropic_queries_is_key_variance():
    # S = 2I: the score error is 2 tr((I - P) C), so PCA is optimal and captures its key variance share;
    # any basis, random included, captures tr(U^T C U) / tr(C), in [0, 1]
    cal, _ = with_queries(torch.full((8,), 2.0))
    share = HALVING.cumsum(0) / HALVING.sum()
    for sv in report.score_variances(cal, (1, 3, 8)):
        assert torch.allclose(sv.key_variance, share[sv.d - 1].expand(2, 2), atol=1e-6)
        assert torch.allclose(sv.captured["pca"], sv.key_variance, atol=1e-6)
        assert torch.allclose(sv.captured["query_aware"], sv.key_variance, atol=1e-6)
        u = report.random_basis(2, 2, 8)[..., :sv.d]
        c = cal.pca[sv.kind].covariance()
        inside = (u.transpose(-1, -2) @ c @ u).diagonal(dim1=-2, dim2=-1).sum(-1) / 15.9375
        assert torch.allclose(sv.captured["random"], inside, atol=1e-6)
        assert ((sv.captured["random"] >= 0) & (sv.captured["random"] <= 1 + 1e-9)).all()
        if sv.d == 8:
            assert torch.allclose(sv.captured["random"], torch.ones(2, 2, dtype=torch.float64), atol=1e-6)


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
    from lokitool.cli.main import main

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


def test_cli_score_variance_section(tmp_path, capsys):
    cal, _ = with_queries(BLIND)
    plain, _, _ = rotated_pair()
    files = [str(tmp_path / "queries.safetensors"), str(tmp_path / "keys-only.safetensors")]
    cal.save(files[0])
    plain.save(files[1])
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["rank-report", *files, "--output-dir", str(out_dir), "--dims", "0.5,0.25"], capsys)
    assert code == 0, err

    data = json.loads((out_dir / "report.json").read_text())
    assert data["dims"] == [0.25, 0.5] and data["d"] == [2, 4]
    with_q, without = data["calibrations"]
    rows = with_q["score_variance"]
    assert [(r["layer"], r["kind"], r["d"]) for r in rows[:4]] == [(0, "pre", 2), (0, "pre", 4), (0, "post", 2), (0, "post", 4)]
    assert len(rows) == 2 * 2 * 2 and "score_variance_note" not in with_q
    last = rows[-1]
    assert (last["layer"], last["kind"], last["d"]) == (1, "post", 4)
    assert last["key_variance"] == pytest.approx([15 / 15.9375] * 2, abs=1e-5)
    assert last["pca"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert last["query_aware"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert len(last["random"]) == 2
    mean = {(m["kind"], m["d"]): m for m in with_q["score_variance_mean"]}
    assert mean[("pre", 2)]["query_aware"] == pytest.approx(0.8, abs=1e-5)
    assert without["score_variance"] is None and "--no-queries" in without["score_variance_note"]

    md = (out_dir / "report.md").read_text()
    assert "## Score variance captured by truncated scores" in md
    assert "| queries | post-RoPE | 4 | 0.941 | 0.000 |" in md
    assert "](1-queries-score_variance.png)" in md and (out_dir / "1-queries-score_variance.png").is_file()
    assert f"- keys-only (`{files[1]}`): no query statistics" in md
    assert not (out_dir / "2-keys-only-score_variance.png").exists()
    assert "score variance captured" in out and "keys-only: no query statistics" in out


@pytest.mark.parametrize("case", ["missing", "foreign", "variance", "dims", "unwritable", "other-model", "twice"])
def test_cli_bad_input_is_one_line(tmp_path, two_files, capsys, case):
    target = tmp_path / "out"
    args = [*two_files, "--output-dir", str(target)]
    expected = {
        "missing": "does not exist",
        "foreign": "not a calibration file",
        "variance": "outside (0, 1]",
        "dims": "dimension fraction 32 is outside (0, 1]",
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
    elif case == "dims":
        args += ["--dims", "0.25,32"]
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
