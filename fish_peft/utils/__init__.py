"""Small tools every layer may use: folders and files saved all at once, and RNG states to resume with."""
