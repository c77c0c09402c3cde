import ArgumentParser
import Foundation
import NameBasedSockets

/// --require, --identity, --pin and --pins, shared by serve and connect.
struct VerificationOptions: ParsableArguments {
    enum Level: String, ExpressibleByArgument, CaseIterable {
        case claimed, dns, key
        var verification: PeerVerification {
            switch self {
            case .claimed: .claimed
            case .dns: .dnsConfirmed
            case .key: .keyVerified
            }
        }
    }

    @Option(name: .long, help: "Refuse peers whose name is verified below this level: dns or key.")
    var require: Level = .claimed

    @Flag(name: .long, help: "Look peers' names up in DNS even without --require dns, so sessions can report dnsConfirmed.")
    var verifyNames = false

    @Option(name: .long, help: "Ed25519 identity key file (mode 0600, from `identity --create`), proven to every peer.")
    var identity: String?

    @Option(name: .long, help: "NAME=BASE64KEY: a peer claiming NAME must prove this Ed25519 public key (repeatable).")
    var pin: [String] = []

    @Option(name: .customLong("pins"), help: "A file of pins, one 'NAME BASE64KEY' per line; '#' starts a comment.")
    var pinsFile: String?

    func loadIdentity() throws -> NBSIdentity? {
        guard let identity else { return nil }
        do { return try IdentityKeyFile.load(from: identity) } catch { throw ValidationError("--identity: \(error)") }
    }

    /// "auto" (or no --name) becomes the identity's self-certifying name.
    func localName(_ given: String) throws -> String {
        guard given == "auto" else { return given }
        guard let identity = try loadIdentity() else {
            throw ValidationError("give --name, or --identity FILE to use that key's self-certifying name")
        }
        return identity.selfCertifyingName
    }

    func pinnedKeys() throws -> [String: [UInt8]] {
        var entries: [(String, String, String)] = pin.map { entry in
            let parts = entry.split(separator: "=", maxSplits: 1)
            return (parts.first.map(String.init) ?? "", parts.count == 2 ? String(parts[1]) : "", "--pin \(entry)")
        }
        if let pinsFile {
            guard let text = try? String(contentsOfFile: pinsFile, encoding: .utf8) else { throw ValidationError("--pins: cannot read \(pinsFile)") }
            for (number, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
                let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
                let fields = line.split(whereSeparator: \.isWhitespace).map(String.init)
                guard !fields.isEmpty else { continue }
                entries.append((fields[0], fields.count == 2 ? fields[1] : "", "\(pinsFile):\(number + 1)"))
            }
        }
        var pins: [String: [UInt8]] = [:]
        for (name, key, origin) in entries {
            guard !name.isEmpty, let bytes = Base64.decode(key), bytes.count == 32 else {
                throw ValidationError("\(origin): expected NAME and a base64 Ed25519 public key (32 bytes)")
            }
            pins[name] = bytes
        }
        return pins
    }

    func apply(to options: inout NBSOptions) throws {
        options.requiredPeerVerification = require.verification
        options.lookUpPeerNames = verifyNames
        options.identity = try loadIdentity()
        options.pinnedKeys = try pinnedKeys()
    }
}

struct Identity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create or show an Ed25519 identity key and its self-certifying name.",
        discussion: "Prints name=SELF-CERTIFYING-NAME and public_key=BASE64, the value peers give to --pin.")

    @Option(name: .long, help: "Create a new key in FILE (mode 0600; an existing file is never overwritten).")
    var create: String?

    @Option(name: .long, help: "Show the name and public key of the key in FILE.")
    var show: String?

    @Flag(name: .long, help: "One JSON object: name, public_key, file.")
    var json = false

    func validate() throws {
        guard (create == nil) != (show == nil) else { throw ValidationError("give exactly one of --create FILE or --show FILE") }
    }

    func run() throws {
        let identity: NBSIdentity
        do {
            if let create { identity = try IdentityKeyFile.create(at: create) } else { identity = try IdentityKeyFile.load(from: show!) }
        } catch {
            throw CLIError("\(error)")
        }
        let publicKey = Base64.encode(identity.publicKey)
        guard json else {
            print("name=\(identity.selfCertifyingName)")
            print("public_key=\(publicKey)")
            return
        }
        let object = ["name": identity.selfCertifyingName, "public_key": publicKey, "file": create ?? show ?? ""]
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
        print(String(decoding: data, as: UTF8.self))
    }
}
