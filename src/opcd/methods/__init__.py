"""The methods as parts of the one step: OPCD, off-policy CD, OVD."""
