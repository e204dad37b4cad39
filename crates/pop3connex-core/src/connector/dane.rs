//! DANE (RFC 7672, RFC 6698/7671) certificate verification for SMTP.
//!
//! Only the two usages RFC 7672 section 3.1.3 allows for SMTP are used:
//! - DANE-EE (3): the server's own certificate (selector 0) or public key
//!   (selector 1) matches the record. Names and validity dates are ignored
//!   (section 3.1.1): the DNSSEC-signed record is the whole authority.
//! - DANE-TA (2): a certificate the server presents matches the record; the
//!   leaf must chain to it (webpki path building with that single anchor,
//!   server-auth EKU, validity dates) and be valid for the MX host name
//!   (section 3.2).
//!
//! PKIX-TA (0) and PKIX-EE (1) records are ignored; a record set with no
//! usable record counts as "no TLSA" ([`DaneVerifier::new`] returns `None`).
//! The handshake signature is always checked with the leaf's key, so a
//! matching record also proves possession of the private key.

use rustls::client::danger::ServerCertVerified;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256, Sha512};

use super::dns::TlsaRecord;
use super::tlsclient::CertCheck;

pub const USAGE_DANE_TA: u8 = 2;
pub const USAGE_DANE_EE: u8 = 3;

/// Whether RFC 7672 lets an SMTP client use the record: usage 2 or 3,
/// selector 0 or 1, matching type 0, 1 or 2 with a well-formed digest.
pub fn is_usable(r: &TlsaRecord) -> bool {
    let usage = matches!(r.usage, USAGE_DANE_TA | USAGE_DANE_EE);
    let selector = matches!(r.selector, 0 | 1);
    let data = match r.matching {
        0 => !r.data.is_empty(),
        1 => r.data.len() == 32,
        2 => r.data.len() == 64,
        _ => false,
    };
    usage && selector && data
}

/// Whether the record matches `cert` (usage aside).
fn matches(r: &TlsaRecord, cert: &CertificateDer<'_>) -> bool {
    let spki;
    let content: &[u8] = match r.selector {
        0 => cert.as_ref(),
        1 => match webpki::EndEntityCert::try_from(cert) {
            Ok(parsed) => {
                spki = parsed.subject_public_key_info();
                spki.as_ref()
            }
            Err(_) => return false,
        },
        _ => return false,
    };
    match r.matching {
        0 => content == r.data.as_slice(),
        1 => Sha256::digest(content).as_slice() == r.data.as_slice(),
        2 => Sha512::digest(content).as_slice() == r.data.as_slice(),
        _ => false,
    }
}

/// Verifies a server certificate chain against DNSSEC-validated TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<TlsaRecord>,
    /// The MX host name (the TLSA base domain), checked for DANE-TA.
    name: ServerName<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl DaneVerifier {
    /// A verifier for the usable records among `records`, or `None` when
    /// there are none (the caller then treats the host as having no TLSA
    /// records) or `host` is not a valid DNS name.
    pub fn new(records: &[TlsaRecord], host: &str) -> Option<DaneVerifier> {
        let records: Vec<TlsaRecord> = records.iter().filter(|r| is_usable(r)).cloned().collect();
        if records.is_empty() {
            return None;
        }
        let name = ServerName::try_from(host.trim_end_matches('.').to_owned()).ok()?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Some(DaneVerifier { records, name, algs })
    }

    /// The usable records this verifier checks.
    pub fn records(&self) -> &[TlsaRecord] {
        &self.records
    }

    fn trust_anchor_ok(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        let Ok(ee) = webpki::EndEntityCert::try_from(end_entity) else {
            return false;
        };
        let ta_records = self.records.iter().filter(|r| r.usage == USAGE_DANE_TA);
        for r in ta_records {
            for ta in intermediates.iter().filter(|c| matches(r, c)) {
                let Ok(anchor) = webpki::anchor_from_trusted_cert(ta) else {
                    continue;
                };
                let chained = ee
                    .verify_for_usage(
                        self.algs.all,
                        &[anchor],
                        intermediates,
                        now,
                        webpki::KeyUsage::server_auth(),
                        None,
                        None,
                    )
                    .is_ok();
                if chained && ee.verify_is_valid_for_subject_name(&self.name).is_ok() {
                    return true;
                }
            }
        }
        false
    }
}

impl CertCheck for DaneVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee_match = self.records.iter().filter(|r| r.usage == USAGE_DANE_EE).any(|r| matches(r, end_entity));
        if ee_match || self.trust_anchor_ok(end_entity, intermediates, now) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General("DANE: no TLSA record matches the server's certificate chain".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    struct Pki {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
        leaf_key: KeyPair,
    }

    fn pki(leaf_name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "DANE test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec![leaf_name.to_owned()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        Pki { ca: ca_cert.der().clone(), leaf: leaf_cert.der().clone(), leaf_key }
    }

    fn rec(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TlsaRecord {
        TlsaRecord { usage, selector, matching, data }
    }

    fn check(v: &DaneVerifier, p: &Pki) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("ignored.example").unwrap();
        v.check(&p.leaf, std::slice::from_ref(&p.ca), &name, &[], UnixTime::now())
    }

    #[test]
    fn dane_ee_spki_sha256_matches_only_the_right_key() {
        let p = pki("mx.example.net");
        let spki = rcgen::PublicKeyData::subject_public_key_info(&p.leaf_key);
        let v = DaneVerifier::new(&[rec(3, 1, 1, Sha256::digest(&spki).to_vec())], "mx.example.net").unwrap();
        assert!(check(&v, &p).is_ok());
        // DANE-EE ignores names: a different MX name still passes.
        let v = DaneVerifier::new(&[rec(3, 1, 1, Sha256::digest(&spki).to_vec())], "other.example").unwrap();
        assert!(check(&v, &p).is_ok());
        let other = pki("mx.example.net");
        assert!(check(&v, &other).is_err());
    }

    #[test]
    fn dane_ee_full_certificate_sha512_and_exact() {
        let p = pki("mx.example.net");
        let v = DaneVerifier::new(&[rec(3, 0, 2, Sha512::digest(&p.leaf).to_vec())], "mx.example.net").unwrap();
        assert!(check(&v, &p).is_ok());
        let v = DaneVerifier::new(&[rec(3, 0, 0, p.leaf.to_vec())], "mx.example.net").unwrap();
        assert!(check(&v, &p).is_ok());
        assert!(check(&v, &pki("mx.example.net")).is_err());
    }

    #[test]
    fn dane_ta_requires_chain_and_name() {
        let p = pki("mx.example.net");
        let ta = rec(2, 0, 1, Sha256::digest(&p.ca).to_vec());
        let v = DaneVerifier::new(std::slice::from_ref(&ta), "mx.example.net").unwrap();
        assert!(check(&v, &p).is_ok());
        // Name checks apply to DANE-TA.
        let v = DaneVerifier::new(std::slice::from_ref(&ta), "mx.other.example").unwrap();
        assert!(check(&v, &p).is_err());
        // The trust anchor must be presented by the server.
        let v = DaneVerifier::new(&[ta], "mx.example.net").unwrap();
        let name = ServerName::try_from("x.example").unwrap();
        assert!(v.check(&p.leaf, &[], &name, &[], UnixTime::now()).is_err());
        // A leaf from a different CA does not chain to the record's TA.
        let other = pki("mx.example.net");
        let mixed = Pki { ca: p.ca.clone(), leaf: other.leaf, leaf_key: other.leaf_key };
        let v = DaneVerifier::new(&[rec(2, 1, 1, Sha256::digest(spki_of(&p.ca)).to_vec())], "mx.example.net").unwrap();
        assert!(check(&v, &p).is_ok());
        assert!(check(&v, &mixed).is_err());
    }

    fn spki_of(cert: &CertificateDer<'_>) -> Vec<u8> {
        webpki::EndEntityCert::try_from(cert).unwrap().subject_public_key_info().as_ref().to_vec()
    }

    #[test]
    fn unusable_records_are_ignored() {
        let p = pki("mx.example.net");
        let digest = Sha256::digest(&p.leaf).to_vec();
        let unusable = [
            rec(0, 0, 1, digest.clone()),
            rec(1, 0, 1, digest.clone()),
            rec(3, 2, 1, digest.clone()),
            rec(3, 0, 3, digest.clone()),
            rec(3, 0, 1, digest[..31].to_vec()),
            rec(3, 0, 0, Vec::new()),
        ];
        assert!(DaneVerifier::new(&unusable, "mx.example.net").is_none());
        let mut mixed = unusable.to_vec();
        mixed.push(rec(3, 0, 1, digest));
        let v = DaneVerifier::new(&mixed, "mx.example.net").unwrap();
        assert_eq!(v.records().len(), 1);
        assert!(check(&v, &p).is_ok());
    }
}
