import Crypto
import NIOCore
import NIOPosix
import Testing

@testable import NameBasedSockets

/// Options for loopback sessions: several loopback addresses stand in for several interfaces.
func loopbackOptions(locals: [String] = ["127.0.0.1"], peers: [String: [String]] = ["server.test": ["127.0.0.1"]]) -> NBSOptions {
    var options = NBSOptions()
    options.localAddresses = locals.map { try! SocketAddress(ipAddress: $0, port: 0) }
    options.resolver = StaticResolver(peers)
    options.closeTimeout = .seconds(30)
    return options
}

func listener(_ name: String = "server.test", options: NBSOptions = NBSOptions()) async throws -> Listener {
    // Port 0: the kernel picks a free port, so concurrent runs never collide.
    try await NBS.listen(localName: name, port: 0, options: options)
}

/// Deterministic bytes.
func pattern(_ count: Int, seed: UInt64 = 1) -> ByteBuffer {
    var bytes = [UInt8](repeating: 0, count: count)
    var s = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    bytes.withUnsafeMutableBufferPointer { out in
        for i in 0..<count {
            s ^= s << 13
            s ^= s >> 7
            s ^= s << 17
            out[i] = UInt8(truncatingIfNeeded: s)
        }
    }
    return ByteBuffer(bytes: bytes)
}

func sha256(_ buffer: ByteBuffer) -> [UInt8] {
    Array(SHA256.hash(data: Array(buffer.readableBytesView)))
}

/// Reads to the end of the stream, hashing as it goes.
func drain(_ session: Session) async throws -> (bytes: Int, digest: [UInt8]) {
    var hash = SHA256()
    var total = 0
    while let chunk = try await session.read() {
        total += chunk.readableBytes
        chunk.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
    }
    return (total, Array(hash.finalize()))
}

/// A bound on how long a test step may take, so a hang fails the test instead of the suite.
func withTimeout<T: Sendable>(_ seconds: Double, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
            throw TimeoutError(what: what, seconds: seconds)
        }
        let result = try await group.next()!
        group.cancelAll()
        return result
    }
}

struct TimeoutError: Error, CustomStringConvertible {
    let what: String
    let seconds: Double
    var description: String { "\(what) did not finish within \(seconds) s" }
}

/// Closes both ends of a session together (each end's close waits for the other's), then the listener.
func closeBothEnds(_ client: Session, _ accepted: Session, listener: Listener) async throws {
    async let acceptedClosed: Void = accepted.close()
    try await client.close()
    try await acceptedClosed
    await listener.close()
}
