"""RaggedKVLayout: the target cache, the draft cache and the slot mask move together when rows join, leave and
are compacted."""

import torch
from transformers import DynamicCache

from dspark_hf import compat
from dspark_hf.engine import RaggedKVLayout
from dspark_hf.models.dspark.modeling_dspark import DSparkContextCache


def make_layout(rows: list[list[int | None]], draft: bool = True) -> RaggedKVLayout:
    """A layout of 2 target layers (and 1 draft layer) whose slot j of row r caches the label `rows[r][j]` (None: a
    hole), as keys `label + layer` and values `-(label + layer)`."""
    labels = torch.tensor([[0 if t is None else t for t in row] for row in rows], dtype=torch.float32)
    valid = torch.tensor([[t is not None for t in row] for row in rows])
    slots = labels[:, None, :, None].expand(-1, 2, -1, 3)  # (R, heads, P, head_dim)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(slots + layer, -(slots + layer), layer)
    draft_cache = None
    if draft:
        draft_cache = DSparkContextCache(1)
        draft_cache.update(0, slots + 10, -(slots + 10))
    return RaggedKVLayout(cache, draft_cache, valid)


def valid_labels(kv: RaggedKVLayout) -> list[list[int]]:
    """The labels of each row's valid slots, checked to agree across every cached tensor."""
    keys, values = compat.cache_layer_tensors(kv.cache)
    tensors = [(k, v, layer) for layer, (k, v) in enumerate(zip(keys, values, strict=True))]
    if kv.draft_cache is not None:
        tensors.append((kv.draft_cache.keys[0], kv.draft_cache.values[0], 10))
    rows = []
    for r in range(kv.valid.shape[0]):
        slots = kv.valid[r].nonzero()[:, 0]
        labels = keys[0][r, 0, slots, 0]
        for k, v, offset in tensors:
            assert k.shape[2] == v.shape[2] == kv.width
            assert torch.equal(k[r, :, slots], (labels + offset)[None, :, None].expand(2, -1, 3))
            assert torch.equal(v, -k)
        rows.append([int(t) for t in labels])
    return rows


def test_merge_left_pads_rows_to_the_common_width():
    kv = make_layout([[1, 2, 3]])
    kv.merge(make_layout([[4, None], [5, 6]]))
    assert kv.width == 3
    assert kv.valid.tolist() == [[True, True, True], [False, True, False], [False, True, True]]
    assert valid_labels(kv) == [[1, 2, 3], [4], [5, 6]]


def test_select_keeps_rows_in_order_and_trims_unused_slots():
    kv = make_layout([[1, 2, 3, None], [None, 4, None, None], [None, 5, 6, None]])
    kv.select(torch.tensor([2, 0]))
    assert valid_labels(kv) == [[5, 6], [1, 2, 3]] and kv.width == 3
    kv.select(torch.tensor([0]))
    assert valid_labels(kv) == [[5, 6]] and kv.width == 2 and kv.valid.all()


def test_compaction_gathers_valid_slots_to_the_right_in_order():
    kv = make_layout([[1, None, 2, None, 3], [None, 4, None, None, 5]], draft=False)
    assert abs(kv.waste() - 0.4) < 1e-9
    kv.compact()
    assert kv.width == 3 and kv.waste() == 0.0
    assert kv.valid.tolist() == [[True, True, True], [False, True, True]]
    assert valid_labels(kv) == [[1, 2, 3], [4, 5]]


def test_map_applies_to_every_cached_tensor():
    kv = make_layout([[1, 2]])
    kv.map(lambda t: t * 2)
    keys, _ = compat.cache_layer_tensors(kv.cache)
    assert keys[1][0, 0, :, 0].tolist() == [4.0, 6.0] and kv.draft_cache.keys[0][0, 0, :, 0].tolist() == [22.0, 24.0]


def test_take_copies_rows_and_leaves_the_layout_as_it_was():
    kv = make_layout([[None, 1, 2], [3, 4, None], [5, 6, 7]])
    taken = kv.take(torch.tensor([1]))
    assert valid_labels(taken) == [[3, 4]] and taken.width == 2  # trimmed to the slots row 1 uses
    assert valid_labels(kv) == [[1, 2], [3, 4], [5, 6, 7]] and kv.width == 3
    taken.map(lambda t: t + 100)  # a copy: changing it leaves the source alone
    assert valid_labels(kv) == [[1, 2], [3, 4], [5, 6, 7]]


def test_truncate_drops_appended_slots_from_every_cache():
    kv = make_layout([[1, 2], [3, None]])
    valid_before = kv.valid
    grown = make_layout([[1, 2, 8], [3, None, 9]])
    kv.cache, kv.draft_cache, kv.valid = grown.cache, grown.draft_cache, grown.valid
    kv.truncate(2, valid_before)
    assert kv.width == 2 and valid_labels(kv) == [[1, 2], [3]]
