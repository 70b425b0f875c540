from sds.demo.corpus import builtin_splits, generate_corpus


def test_corpus_is_deterministic_and_seed_dependent():
    assert generate_corpus(20, 1) == generate_corpus(20, 1)
    assert generate_corpus(20, 1) != generate_corpus(20, 2)


def test_splits_share_no_documents():
    """At the default sizes (2,000 train, 100 test documents): every document is in one split only, and
    none repeats inside a split. Documents are separated by blank lines; paragraphs by single newlines."""
    splits = builtin_splits(2000, 100, 0)
    train, test = (splits[k].strip("\n").split("\n\n") for k in ("train", "test"))
    assert len(train) == 2000 and len(test) == 100
    assert len(set(train)) == 2000 and len(set(test)) == 100
    assert set(train).isdisjoint(test)
    assert splits["train"] == generate_corpus(2000, 0) and splits["test"] != generate_corpus(100, 0)


def test_vocabulary_is_real_and_small():
    splits = builtin_splits(30, 10, 0)
    words = set(splits["train"].split())
    assert 150 < len(words) < 2000  # a real vocabulary, small enough for a tiny BPE model
