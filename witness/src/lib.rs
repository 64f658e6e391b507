//! `metro-witness`: a raft voter in the third site that stores no volume data.
