//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table filled from each
//! endpoint's own permutation. Every endpoint owns ~1/N of the table, and when one leaves,
//! only the slots it owned move.

/// Table sizes (primes). The size must not change with small changes of the endpoint
/// count, or every key moves: 16381 slots up to 160 endpoints, 65521 above.
const SMALL: usize = 16381;
const LARGE: usize = 65521;

#[derive(Debug, Clone, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

pub(crate) fn mix(mut h: u64) -> u64 {
    // splitmix64's finalizer: spreads every input bit over the output.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn hash_str(s: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

impl Maglev {
    pub fn new<'a>(names: impl Iterator<Item = &'a str>) -> Maglev {
        let names: Vec<&str> = names.collect();
        let n = names.len();
        if n == 0 {
            return Maglev::default();
        }
        let m = if n <= 160 { SMALL } else { LARGE };
        let perms: Vec<(usize, usize)> = names
            .iter()
            .map(|name| {
                let offset = (hash_str(name, 0x5eed) % m as u64) as usize;
                let skip = (hash_str(name, 0xfeed) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    /// The endpoint for `hash`; if it is not usable, the next usable one in table order
    /// (so a down endpoint's keys spread instead of all landing on one neighbour).
    pub fn lookup(&self, hash: u64, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let start = (hash % m as u64) as usize;
        (0..m)
            .map(|i| self.table[(start + i) % m] as usize)
            .find(|&e| usable(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_and_minimally_disruptive() {
        let names: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:80")).collect();
        let full = Maglev::new(names.iter().map(String::as_str));
        let mut owned = [0usize; 10];
        for e in &full.table {
            owned[*e as usize] += 1;
        }
        let m = full.table.len();
        for o in owned {
            assert!(o * 10 > m * 8 / 10 && o * 10 < m * 12 / 10, "{owned:?}");
        }
        // Remove endpoint 3: keys owned by others mostly stay.
        let fewer: Vec<&str> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, s)| s.as_str())
            .collect();
        let after = Maglev::new(fewer.iter().copied());
        let mut moved = 0;
        let mut total = 0;
        for k in 0..10_000u64 {
            let h = mix(k);
            let before = names[full.lookup(h, &|_| true).unwrap()].as_str();
            let now = fewer[after.lookup(h, &|_| true).unwrap()];
            if before != "10.0.0.3:80" {
                total += 1;
                if before != now {
                    moved += 1;
                }
            }
        }
        assert!(
            moved * 100 < total * 5,
            "only a few keys of remaining endpoints move: {moved}/{total}"
        );
        // Same key, same endpoint, every time.
        assert_eq!(full.lookup(42, &|_| true), full.lookup(42, &|_| true));
    }
}

#[cfg(test)]
mod small_sets {
    use super::*;

    /// Regression: the table size once depended on the endpoint count, so going from
    /// three endpoints to two moved half of all keys.
    #[test]
    fn three_to_two() {
        let names: Vec<String> = (0..3).map(|i| format!("127.0.0.1:4{i}000")).collect();
        let full = Maglev::new(names.iter().map(String::as_str));
        let fewer: Vec<&str> = names[..2].iter().map(String::as_str).collect();
        let after = Maglev::new(fewer.iter().copied());
        let (mut moved, mut total) = (0, 0);
        for k in 0..10_000u64 {
            let h = mix(k);
            let before = names[full.lookup(h, &|_| true).unwrap()].as_str();
            if before == names[2] {
                continue;
            }
            total += 1;
            if fewer[after.lookup(h, &|_| true).unwrap()] != before {
                moved += 1;
            }
        }
        assert!(moved * 20 < total, "moved {moved}/{total}");
    }
}
