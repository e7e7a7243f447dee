"""Reading and checking images, atomic writes, output naming, manifests."""
