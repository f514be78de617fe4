"""The benchmark itself: every selected probe × model × condition case, gated on expectations/.

These tests are parametrized by the lem plugin and deselected unless -m names a case marker
(p20, p100, paper, training, lem_case) or --lem-cases is given.
"""

from lem_fixtures.snapshots import ResponseSnapshotExtension, snapshot_view


def test_probe(lem_result, lem_gate, snapshot):
    failure = lem_gate.case_failure(lem_result)

    assert snapshot_view(lem_result) == snapshot(extension_class=ResponseSnapshotExtension)
    assert failure is None, failure


def test_summary(lem_summary, lem_gate):
    model, condition = lem_summary

    check = lem_gate.check_summary(model, condition)

    assert not check.failed, check.message()
