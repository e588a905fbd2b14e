//! Accountant queries (RDP, PLD) for 10,000 steps; clip + noise of a 1M-element update.

use std::hint::black_box;

use covey_privacy::clip::{ClipNorm, clip};
use covey_privacy::noise::{NoiseMultiplier, SecureRng, privatize};
use covey_privacy::{pld, rdp};
use criterion::{Criterion, criterion_group, criterion_main};

fn accountant(c: &mut Criterion) {
    c.bench_function("rdp epsilon, q=0.01 z=1.1 T=10000", |b| {
        b.iter(|| rdp::epsilon(black_box(0.01), black_box(1.1), black_box(10_000), 1e-5))
    });
    let mut group = c.benchmark_group("pld epsilon, T=10000");
    group.sample_size(10);
    // A federated point (1 % of the devices a round, z = 1.1) and the slowest point of
    // the test grid (half the devices, z = 0.5: ε in the thousands, a 10^7-point PLD).
    for (q, z) in [(0.01, 1.1), (0.5, 0.5)] {
        group.bench_function(format!("q={q} z={z}"), |b| {
            b.iter(|| pld::epsilon(black_box(q), black_box(z), black_box(10_000), 1e-5))
        });
    }
    group.finish();
}

fn clip_and_noise(c: &mut Criterion) {
    let update: Vec<f32> = (0..1_000_000).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let mut rng = SecureRng::from_os().expect("os rng");
    let cn = ClipNorm::new(1.0).expect("c");
    let z = NoiseMultiplier::new(1.0).expect("z");
    let mut group = c.benchmark_group("1M-element update");
    group.sample_size(10);
    group.bench_function("clip + noise", |b| {
        b.iter(|| privatize(clip(black_box(update.clone()), cn).expect("clip"), z, &mut rng))
    });
    group.finish();
}

criterion_group!(benches, accountant, clip_and_noise);
criterion_main!(benches);
