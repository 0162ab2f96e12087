"""``inspect``: spectra, interference and energy of adapters before blending them, and their plot."""
