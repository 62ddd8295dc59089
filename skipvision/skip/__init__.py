"""Skip-Vision core: Skip-FFN, skip plans, token compression, summary tokens, skip policies."""
