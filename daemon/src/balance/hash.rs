//! Consistent hashing: Envoy's ring hash (`ringHash`) and Maglev (`maglev`) tables, keyed by the
//! endpoints' `address:port` strings, so that two proxies with the same endpoint set build the
//! same table and a key maps to the same endpoint on both.
//!
//! Invariant: tables are built once and only read; every entry is an endpoint index `< len`.

use xxhash_rust::xxh64::xxh64;

/// A consistent-hash lookup table.
#[derive(Debug)]
pub enum HashTable {
    /// Sorted `(point, endpoint)` pairs; a key goes to the first point at or after its hash.
    Ring(Vec<(u64, u32)>),
    /// `table_size` slots, each naming an endpoint.
    Maglev(Vec<u32>),
}

/// The 64-bit hash of a key (xxHash64, seed 0, as Envoy uses).
pub fn key_hash(key: &[u8]) -> u64 {
    xxh64(key, 0)
}

// === impl HashTable ===

impl HashTable {
    /// A ring with about `min_size` points, each endpoint owning points in proportion to its
    /// weight (at least one).
    pub fn ring(keys: &[String], weights: &[u32], min_size: u64) -> Self {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum::<u64>().max(1);
        let min_size = min_size.clamp(1, 8 * 1024 * 1024);
        let mut points = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let share = (min_size * u64::from(weights[i])).div_ceil(total).max(1);
            for k in 0..share {
                points.push((key_hash(format!("{key}_{k}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        HashTable::Ring(points)
    }

    /// Ring points or table entries.
    pub fn slots(&self) -> usize {
        match self {
            HashTable::Ring(points) => points.len(),
            HashTable::Maglev(table) => table.len(),
        }
    }

    /// A Maglev table of `size` slots (a prime), filled by each endpoint's permutation with
    /// turns in proportion to its weight.
    pub fn maglev(keys: &[String], weights: &[u32], size: u64) -> Self {
        let m = size.max(1) as usize;
        let n = keys.len();
        if n == 0 {
            return HashTable::Maglev(Vec::new());
        }
        let offset: Vec<u64> = keys
            .iter()
            .map(|k| xxh64(k.as_bytes(), 0) % m as u64)
            .collect();
        let skip: Vec<u64> = keys
            .iter()
            .map(|k| xxh64(k.as_bytes(), 1) % (m as u64 - 1).max(1) + 1)
            .collect();
        let max_w = f64::from(*weights.iter().max().unwrap_or(&1));
        let mut table = vec![u32::MAX; m];
        let mut next = vec![0u64; n];
        let mut credit = vec![0f64; n];
        let mut filled = 0;
        while filled < m {
            for i in 0..n {
                credit[i] += f64::from(weights[i]) / max_w;
                while credit[i] >= 1.0 && filled < m {
                    credit[i] -= 1.0;
                    loop {
                        let c = ((offset[i] + next[i] * skip[i]) % m as u64) as usize;
                        next[i] += 1;
                        if table[c] == u32::MAX {
                            table[c] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        HashTable::Maglev(table)
    }

    /// The endpoint for a key hash.
    pub fn lookup(&self, hash: u64) -> usize {
        match self {
            HashTable::Ring(points) => {
                let i = points.partition_point(|(p, _)| *p < hash);
                points
                    .get(i)
                    .or(points.first())
                    .map_or(0, |(_, e)| *e as usize)
            }
            HashTable::Maglev(table) if table.is_empty() => 0,
            HashTable::Maglev(table) => table[(hash % table.len() as u64) as usize] as usize,
        }
    }

    /// Istio's name for the table kind.
    pub fn name(&self) -> &'static str {
        match self {
            HashTable::Ring(_) => "consistentHash/ringHash",
            HashTable::Maglev(_) => "consistentHash/maglev",
        }
    }
}
