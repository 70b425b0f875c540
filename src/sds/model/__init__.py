"""Model plumbing: loading checkpoints, decoder layers and their linears, layer-by-layer passes and streams,
stage checkpoints. Nothing here prunes or fits; the algorithms get plain tensors."""
