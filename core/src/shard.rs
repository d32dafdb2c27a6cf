//! Which sender instance owns a destination when several share the work.

use alloc::string::String;

use sha2::{Digest, Sha256};

/// Whether `instance` sends to `destination` among `instances`, as Synapse decides it:
/// nobody when the list is empty, the only instance when there is one, otherwise the
/// instance at index SHA-256(destination) read as a little-endian integer, modulo the count.
pub fn should_handle(instances: &[String], instance: &str, destination: &str) -> bool {
    match instances.len() {
        0 => false,
        1 => instances[0] == instance,
        count => instances.get(owner_index(destination, count)).is_some_and(|owner| owner == instance),
    }
}

fn owner_index(destination: &str, count: usize) -> usize {
    let digest = Sha256::digest(destination.as_bytes());
    let modulus = count as u128;
    // Horner's rule from the most significant byte, which is the last one in little-endian.
    let remainder = digest.iter().rev().fold(0u128, |acc, &byte| (acc * 256 + u128::from(byte)) % modulus);
    // The remainder is below `count`, which is a usize.
    remainder as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    #[test]
    fn every_destination_has_exactly_one_owner() {
        let instances: Vec<String> = ["s1", "s2", "s3"].iter().map(|s| s.to_string()).collect();
        let mut used = [0u32; 3];
        for i in 0..300 {
            let dest = alloc::format!("other_server_{i}");
            let owners: Vec<usize> = (0..3).filter(|&k| should_handle(&instances, &instances[k], &dest)).collect();
            assert_eq!(owners.len(), 1);
            used[owners[0]] += 1;
        }
        assert!(used.iter().all(|&n| n > 50), "{used:?}");
        assert!(!should_handle(&[], "main", "x"));
        assert!(should_handle(&["main".to_string()], "main", "x"));
    }

    #[test]
    fn little_endian_reading_matches_a_direct_big_integer_computation() {
        // For count = 2 only the lowest bit of the little-endian integer matters: byte 0's bit 0.
        for name in ["a", "host2", "matrix.org"] {
            let digest = Sha256::digest(name.as_bytes());
            assert_eq!(owner_index(name, 2), usize::from(digest[0] & 1));
            assert_eq!(owner_index(name, 256), usize::from(digest[0]));
        }
    }
}
