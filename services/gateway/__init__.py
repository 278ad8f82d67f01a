"""Gateway: the public API (Ask, AddDocuments); reaches the other tiers only through protos."""
