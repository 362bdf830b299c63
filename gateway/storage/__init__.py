"""Storage: named volumes (`volumes`), the local store (`local`), patches and files at create."""
