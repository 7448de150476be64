"""Scan kernels: plain functions and autograd Functions, no nn.Modules (reference, fused CPU, Triton, SSD)."""
