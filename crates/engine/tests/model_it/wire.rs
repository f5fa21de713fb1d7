//! The activation wire format.

use crate::common::*;

// ------------------------------------------------------------ wire format

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn wire_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        // Random input either decodes to a tensor whose encoding is exactly
        // the input, or is an error.
        if let Ok(t) = tensor_from_bytes(&bytes) {
            prop_assert_eq!(tensor_to_bytes(&t).expect("re-encode"), bytes);
        }
    }

    #[test]
    fn wire_round_trips_and_rejects_every_truncation(
        rows in 0usize..5,
        cols in 0usize..7,
        seed in any::<u64>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut rng = Rng(engine::testing::Rng(seed));
        let t = rng.tensor(&[rows, cols], 100.0, 0.0);
        let bytes = tensor_to_bytes(&t).expect("encode");
        let back = tensor_from_bytes(&bytes).expect("decode");
        prop_assert_eq!(back.dims(), t.dims());
        prop_assert_eq!(back.to_vec2::<f32>().expect("rows"), t.to_vec2::<f32>().expect("rows"));
        let cut = cut.index(bytes.len());
        prop_assert!(tensor_from_bytes(&bytes[..cut]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(tensor_from_bytes(&longer).is_err());
    }
}
