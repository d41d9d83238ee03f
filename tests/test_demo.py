"""The demo chain end to end at tiny sizes: phantoms -> ... -> report (what `make demo` runs)."""

import json


def test_quick_demo_runs_the_whole_chain(ray_session, tmp_path, capsys):
    import jobs.demo as demo

    assert demo.main(["--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "Done in" in out and str(tmp_path / "report" / "report.html") in out

    fdd = json.loads((tmp_path / "fdd" / "fdd.json").read_text())
    assert set(fdd["synthetic"]) == {"proposed", "cdcgan"}
    # The evaluation sets hold the same count of every class, Normal included, so FDD and
    # class-consistency are over all nine classes at equal sizes.
    assert len(fdd["classes"]) == 9 and "Normal" in fdd["classes"]
    for row in fdd["synthetic"].values():
        assert set(row["n"].values()) == {demo.QUICK.eval_per_class}
    # The sample-level metrics and the near-copy rate sit beside FDD, from the same banks the
    # audit reused: one bank per set and split, none built twice.
    for row in fdd["synthetic"].values():
        assert set(row["kid"]) == set(row["prdc"]) == set(row["memorization"]) == set(fdd["classes"])
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert sum(audit["synthetic"]["n"].values()) == 9 * demo.QUICK.eval_per_class
    banks = list((tmp_path / "synthetic" / "proposed" / "_features").rglob("bank.json"))
    assert len(banks) == 1
    utility = json.loads((tmp_path / "utility" / "utility.json").read_text())
    assert set(utility["arms"]) == {"real", "real+synthetic"}
    html = (tmp_path / "report" / "report.html").read_text()
    for heading in ("Loss curves", "Table 1", "Table 2", "Class balance", "Downstream utility",
                    "Fidelity, diversity and privacy", "Memorization audit"):
        assert heading in html
    assert "data:image/png;base64," in html
    # Balancing made every class reach the target: real train + synthetic = target per class.
    synth = json.loads((tmp_path / "synthetic" / "proposed-balanced" / "_manifest.json").read_text())
    target = demo.QUICK.target_per_class
    assert all(p["real"] + p["to_generate"] == max(target, p["real"]) for p in synth["plan"])
