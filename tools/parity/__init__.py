"""Side tools for the parity fixtures (need torch + torchvision from a side environment; never
imported by the product or the tests)."""
