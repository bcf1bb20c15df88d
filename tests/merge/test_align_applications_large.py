"""``align`` on the three slowest keras.applications families: the checks of ``test_align_applications``.

VGG16 (its Dense 4096 layers: 4096x4096 assignments), ResNet50V2 and Xception
take 30-90 s a test on 2 CPU cores; in a file of their own pytest-xdist runs
them beside the other families. VGG16 has no BatchNorm: its random head is
scaled up (see ``test_align_applications._member``) so that its probabilities
are not near-uniform and a misplaced unit shows.
"""

import pytest

from tests.merge.test_align_applications import (
    check_align_undoes_a_known_random_permutation,
    check_aligned_members_predict_the_same_probabilities,
)

LARGE = ["VGG16", "ResNet50V2", "Xception"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_aligned_members_predict_the_same_probabilities(name):
    check_aligned_members_predict_the_same_probabilities(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_align_undoes_a_known_random_permutation_of_every_group(name):
    check_align_undoes_a_known_random_permutation(name)
