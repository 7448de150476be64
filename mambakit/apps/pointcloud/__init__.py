"""Point clouds: Point Cloud Mamba (classification, part segmentation) with serialized scans, against
PointNet++, Point Transformer and DGCNN, on ModelNet40 / ScanObjectNN / ShapeNetPart files, meshes and PyG data."""
