def store_kv(key, value, k_cache, v_cache, slot_mapping):
    """Scatter each token's K/V row into its cache slot; slot -1 skips the token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]
