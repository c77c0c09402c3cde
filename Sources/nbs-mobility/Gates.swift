import Foundation

/// At most `limit` operations at once; the others wait their turn in order. `connect --sessions
/// 10000` opening everything at once would overrun the listener's handshake limit and the kernel's
/// accept queue, and have every handshake time out together.
actor AsyncLimiter {
    private let limit: Int
    private var running = 0
    private var waiting: [CheckedContinuation<Void, Never>] = []
    private var head = 0

    init(_ limit: Int) { self.limit = max(1, limit) }

    func run<T: Sendable>(_ operation: @Sendable () async throws -> T) async throws -> T {
        await acquire()
        defer { release() }
        return try await operation()
    }

    private func acquire() async {
        if running < limit {
            running += 1
            return
        }
        await withCheckedContinuation { waiting.append($0) }
    }

    /// Hands the slot straight to the next waiter, so `running` never drops below the limit while
    /// others wait.
    private func release() {
        guard head < waiting.count else {
            running -= 1
            return
        }
        let next = waiting[head]
        head += 1
        if head == waiting.count {
            waiting.removeAll()
            head = 0
        }
        next.resume()
    }
}

/// Lets sessions wait until every one of `count` has been opened (or failed to), so that they
/// start sending, or hold idle, from the same instant. Says on stderr when that happens: scripts
/// wait for the line before they measure.
actor OpenBarrier {
    private var remaining: Int
    private var failed = 0
    private let count: Int
    private let started = ContinuousClock.now
    private var waiters: [CheckedContinuation<Void, Never>] = []

    init(_ count: Int) {
        self.count = count
        remaining = count
    }

    func arrive(opened: Bool) {
        guard remaining > 0 else { return }
        remaining -= 1
        if !opened { failed += 1 }
        guard remaining == 0 else { return }
        let seconds = (ContinuousClock.now - started).seconds
        FileHandle.standardError.write(Data(String(format: "nbs-mobility: %d of %d sessions open after %.2f s\n", count - failed, count, seconds).utf8))
        for waiter in waiters { waiter.resume() }
        waiters.removeAll()
    }

    func wait() async {
        guard remaining > 0 else { return }
        await withCheckedContinuation { waiters.append($0) }
    }
}
