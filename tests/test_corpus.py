from sds.corpus import builtin_splits, generate_corpus


def test_corpus_is_deterministic_and_seed_dependent():
    assert generate_corpus(20, 1) == generate_corpus(20, 1)
    assert generate_corpus(20, 1) != generate_corpus(20, 2)


def test_splits_are_disjoint_streams():
    splits = builtin_splits(30, 10, 0)
    assert splits["train"][:2000] != splits["test"][:2000]
    assert len(splits["train"].split()) > 3 * len(splits["test"].split())
    words = set(splits["train"].split())
    assert 150 < len(words) < 2000  # a real vocabulary, small enough for a tiny BPE model
