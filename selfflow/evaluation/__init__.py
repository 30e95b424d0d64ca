"""Measuring a model: linear probes layer by layer, FID-family metrics with the standard Inception
network, recognition shares of samples by reference classifiers, prompt following.

May import sampling/, interop/, objectives/, models/, flow/, tokenizers/, data/, io/.
"""
