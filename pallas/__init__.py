"""GPU kernels for MSA (Pallas). The kernels land with the Pallas issues; see DESIGN.md."""
