"""Formats shared with others: selfflow checkpoints read as data, weights exports with a model card,
the released Self-Flow checkpoint in both directions, hub-style folders.

May import objectives/, models/, flow/, tokenizers/, data/, io/.
"""
