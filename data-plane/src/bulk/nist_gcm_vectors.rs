// NIST CAVP AES-256-GCM known answers, shared by the engines' tests: this
// file is not a module; `src/bulk/tests.rs` and `tests/bulk_gpu.rs` each
// `include!` it.

/// One AES-256-GCM known answer: key, 96-bit IV, PT, AAD, CT, 128-bit tag.
struct Vector {
    key: &'static str,
    iv: &'static str,
    pt: &'static str,
    aad: &'static str,
    ct: &'static str,
    tag: &'static str,
}

/// NIST CAVP, "GCM Test Vectors (SP 800-38D)", `gcmtestvectors.zip`,
/// file `gcmEncryptExtIV256.rsp`: the first vector (Count = 0) of the
/// sections `[Keylen = 256] [IVlen = 96] [Taglen = 128]` with the PTlen/AADlen
/// (bits) noted on each, plus a second empty/empty one. Copied as RustCrypto's
/// `aes-gcm` 0.10.3 carries them in `tests/aes256gcm.rs`.
/// <https://csrc.nist.gov/Projects/cryptographic-algorithm-validation-program/CAVP-TESTING-BLOCK-CIPHER-MODES>
const NIST: &[Vector] = &[
    // PTlen = 0, AADlen = 0, Count = 0
    Vector {
        key: "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
        iv: "516c33929df5a3284ff463d7",
        pt: "",
        aad: "",
        ct: "",
        tag: "bdc1ac884d332457a1d2664f168c76f0",
    },
    // PTlen = 0, AADlen = 0, Count = 1
    Vector {
        key: "5fe0861cdc2690ce69b3658c7f26f8458eec1c9243c5ba0845305d897e96ca0f",
        iv: "770ac1a5a3d476d5d96944a1",
        pt: "",
        aad: "",
        ct: "",
        tag: "196d691e1047093ca4b3d2ef4baba216",
    },
    // PTlen = 0, AADlen = 128, Count = 0
    Vector {
        key: "78dc4e0aaf52d935c3c01eea57428f00ca1fd475f5da86a49c8dd73d68c8e223",
        iv: "d79cf22d504cc793c3fb6c8a",
        pt: "",
        aad: "b96baa8c1c75a671bfb2d08d06be5f36",
        ct: "",
        tag: "3e5d486aa2e30b22e040b85723a06e76",
    },
    // PTlen = 128, AADlen = 0, Count = 0
    Vector {
        key: "31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22",
        iv: "0d18e06c7c725ac9e362e1ce",
        pt: "2db5168e932556f8089a0622981d017d",
        aad: "",
        ct: "fa4362189661d163fcd6a56d8bf0405a",
        tag: "d636ac1bbedd5cc3ee727dc2ab4a9489",
    },
    // PTlen = 128, AADlen = 128, Count = 0
    Vector {
        key: "92e11dcdaa866f5ce790fd24501f92509aacf4cb8b1339d50c9c1240935dd08b",
        iv: "ac93a1a6145299bde902f21a",
        pt: "2d71bcfa914e4ac045b2aa60955fad24",
        aad: "1e0889016f67601c8ebea4943bc23ad6",
        ct: "8995ae2e6df3dbf96fac7b7137bae67f",
        tag: "eca5aa77d51d4a0a14d9c51e1da474ab",
    },
    // PTlen = 104, AADlen = 128, Count = 0 (a partial last block)
    Vector {
        key: "dad89d9be9bba138cdcf8752c45b579d7e27c3dbb40f53e771dd8cfd500aa2d5",
        iv: "cfb2aec82cfa6c7d89ee72ff",
        pt: "b526ba1050177d05b0f72f8d67",
        aad: "6e43784a91851a77667a02198e28dc32",
        ct: "8b29e66e924ecae84f6d8f7d68",
        tag: "1e365805c8f28b2ed8a5cadfd9079158",
    },
    // PTlen = 256, AADlen = 160, Count = 0
    Vector {
        key: "5853c020946b35f2c58ec427152b840420c40029636adcbb027471378cfdde0f",
        iv: "eec313dd07cc1b3e6b068a47",
        pt: "ce7458e56aef9061cb0c42ec2315565e6168f5a6249ffd31610b6d17ab64935e",
        aad: "1389b522c24a774181700553f0246bbabdd38d6f",
        ct: "eadc3b8766a77ded1a58cb727eca2a9790496c298654cda78febf0da16b6903b",
        tag: "3d49a5b32fde7eafcce90079217ffb57",
    },
    // PTlen = 408, AADlen = 720, Count = 0
    Vector {
        key: "148579a3cbca86d5520d66c0ec71ca5f7e41ba78e56dc6eebd566fed547fe691",
        iv: "b08a5ea1927499c6ecbfd4e0",
        pt: "9d0b15fdf1bd595f91f8b3abc0f7dec927dfd4799935a1795d9ce00c9b879434420fe42c275a7cd7b39d638fb81ca52b49dc41",
        aad: "e4f963f015ffbb99ee3349bbaf7e8e8e6c2a71c230a48f9d59860a29091d2747e01a5ca572347e247d25f56ba7ae8e05cde2be3c97931292c02370208ecd097ef692687fecf2f419d3200162a6480a57dad408a0dfeb492e2c5d",
        ct: "2097e372950a5e9383c675e89eea1c314f999159f5611344b298cda45e62843716f215f82ee663919c64002a5c198d7878fd3f",
        tag: "adbecdb0d5c2224d804d2886ff9a5760",
    },
];
